"""Generate landscapes from label maps and style references (IIDM inference).

    python infer.py                                    # the embedded default (demo model)
    python infer.py --input_path MASKS --img_path TRAIN_ROOT --output_path OUT --ckpt MODEL

MASKS holds the label PNGs and label_to_img.json; outputs are OUT/MASK.jpg.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import jittor_env

REPO = Path(__file__).resolve().parent
DEMO_CHECKPOINT = REPO / "checkpoints" / "demo" / "ldm.safetensors"
NO_MODEL = 2  # exit status: nothing was generated because no model is available


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_path", type=Path, help="folder of label PNGs with label_to_img.json")
    parser.add_argument("--img_path", type=Path, help="training root (or its imgs/ folder) holding the references")
    parser.add_argument("--output_path", type=Path, help="folder for the generated MASK.jpg files")
    parser.add_argument("--ckpt", type=Path, action="append", default=[],
                        help="diffusion checkpoint; give it several times to average them")
    jittor_env.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    jittor_env.setup(force_cpu=args.cpu, verbose=args.verbose)
    checkpoints = args.ckpt or ([DEMO_CHECKPOINT] if DEMO_CHECKPOINT.is_file() else [])
    missing = [str(p) for p in checkpoints if not Path(p).is_file()]
    if missing:
        print(f"infer.py: checkpoint not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    # The generation pipeline is not built yet; say so instead of pretending to generate.
    print("infer.py: no model is available yet. This release has the data layout, the synthetic\n"
          "landscape generator and the Jittor environment; the diffusion model, the demo\n"
          f"checkpoint ({DEMO_CHECKPOINT}) and the IIDM pipeline come next.\n"
          "Nothing was generated. Try: python -m datasets.synthetic --out data/synthetic --n 200",
          file=sys.stderr)
    return NO_MODEL


if __name__ == "__main__":
    sys.exit(main())
