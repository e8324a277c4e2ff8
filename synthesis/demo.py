"""The embedded default: the shipped demo model and a few synthetic masks and references, so that
``python infer.py`` generates something with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

from datasets.landscape import MAPPING_FILE

REPO = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo" / "unet.safetensors"
DEMO_VQ = REPO / "checkpoints" / "demo" / "vq.safetensors"
DEMO_OUTPUT = REPO / "outputs" / "demo"
DEMO_HEIGHT, DEMO_WIDTH, DEMO_MASKS, DEMO_PHOTOS = 96, 128, 4, 6


def prepare_demo(output: Path) -> tuple[Path, Path, Path]:
    """Synthetic masks and references under OUTPUT/inputs (written once, then reused):
    (masks folder, training root, mapping file)."""
    from datasets.synthetic import write_dataset

    inputs = Path(output) / "inputs"
    mapping = inputs / "test" / "labels" / MAPPING_FILE
    if not mapping.is_file():
        write_dataset(inputs, DEMO_PHOTOS, DEMO_HEIGHT, DEMO_WIDTH, seed=0, n_test=DEMO_MASKS, overwrite=True)
    return inputs / "test" / "labels", inputs / "train", mapping


def no_model_message(checkpoint: Path = DEMO_CHECKPOINT, vq: Path = DEMO_VQ) -> str:
    return ("infer.py: no model is available: the embedded default needs the demo model\n"
            f"  {checkpoint}\n  {vq}\n"
            "which ships with the repository (is the clone complete?). Nothing was generated. Give your own\n"
            "with --ckpt UNET.safetensors --vq VQ.safetensors, or make data to train one:\n"
            "python -m datasets.synthetic --output_path data/synthetic --n 200")
