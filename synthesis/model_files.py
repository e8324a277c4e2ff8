"""The model files a generation run loads, found before any network is: the U-Net checkpoints and
the autoencoder given, else the shipped demo model (``synthesis.demo``). ``Stop`` carries what
cannot be done and the exit status that says so; infer.py and app.py report it."""

from __future__ import annotations

from pathlib import Path

from synthesis.demo import DEMO_CHECKPOINT, DEMO_VQ, no_model_message

FAILED = 1    # exit status: bad files, or some images failed
NO_MODEL = 2  # exit status: nothing was generated because no model is available


class Stop(Exception):
    """Nothing (more) can be done: the message and the exit status."""

    def __init__(self, message: str, status: int = FAILED):
        super().__init__(message)
        self.status = status


def model_files(checkpoints: list[Path], vq: Path | None = None, demo_checkpoint: Path = DEMO_CHECKPOINT,
                demo_vq: Path = DEMO_VQ) -> tuple[list[Path], Path]:
    """The U-Net checkpoints and the autoencoder: those given (the autoencoder defaults to
    vq.safetensors beside the first checkpoint), else the demo model ``demo_checkpoint`` and
    ``demo_vq`` (the shipped one by default)."""
    checkpoints = list(checkpoints)
    if not checkpoints:
        if not (demo_checkpoint.is_file() and demo_vq.is_file()):
            raise Stop(no_model_message(demo_checkpoint, demo_vq), NO_MODEL)
        checkpoints, vq = [demo_checkpoint], vq or demo_vq
    vq_path = vq or checkpoints[0].parent / "vq.safetensors"
    missing = [str(p) for p in [*checkpoints, vq_path] if not Path(p).is_file()]
    if missing:
        hint = "" if vq else " (give the autoencoder with --vq)"
        raise Stop(f"infer.py: checkpoint not found: {', '.join(missing)}{hint}")
    return checkpoints, vq_path


def model_file_problem(checkpoints: list[Path], vq: Path | None) -> str | None:
    """What is wrong with the model files given as options (each must be a file; without ``vq``
    the autoencoder beside the first checkpoint must exist), or None: an option error, found
    before anything loads."""
    for flag, path in [("ckpt", path) for path in checkpoints] + [("vq", vq)]:
        if path is not None and not Path(path).exists():
            return f"--{flag} {path}: not found"
        if path is not None and not Path(path).is_file():
            return f"--{flag} {path}: not a file"
    beside = Path(checkpoints[0]).parent / "vq.safetensors" if checkpoints and vq is None else None
    if beside is not None and not beside.is_file():
        return f"{beside}: not found (the autoencoder beside the first --ckpt); give the autoencoder with --vq"
    return None
