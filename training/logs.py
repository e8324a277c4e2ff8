"""The training log: one strict-JSON record per optimizer step in ``RUN_DIR/log.jsonl``.

Records are written as they happen and flushed, so a killed run keeps every finished step.
Non-finite numbers are not JSON (``NaN`` breaks jq, browsers and strict parsers): they are written
as ``null``, and the record's ``skipped`` says why the step did not update. On resume, the log is
made to agree with the checkpoint: a partial last line (a kill mid-write) and every record past the
checkpoint's step (steps the resumed run will redo) are dropped, with one warning saying how many.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from datasets.io import atomic_write

log = logging.getLogger("iidm.training")

LOG_FILE = "log.jsonl"


class LogError(ValueError):
    """A log that cannot be repaired (a broken line before the last)."""


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (recursively), so it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def repair_log(path: str | os.PathLike, step: int) -> int:
    """Keep the records of steps <= ``step`` and drop a partial last line; returns how many
    records were dropped (0: the file is left untouched). A broken line before the last is an
    error naming the file and the line: it did not come from a kill and is not guessed at."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]   # tail: text after the last newline (partial when not empty)
    kept, dropped = [], 1 if tail.strip() else 0
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(complete) and not tail.strip():
                dropped += 1    # the last line, cut where a newline happened to be
                continue
            raise LogError(f"{path}: line {number} is not a JSON record with a step ({raw[:80]!r}); the "
                           "log cannot be repaired: move it away to resume") from None
        if record_step <= step:
            kept.append(raw)
        else:
            dropped += 1
    if dropped:
        with atomic_write(path, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
        log.warning("%s: dropped %d record(s) past step %d (steps the resumed run redoes, or a line cut "
                    "by a kill)", path, dropped, step)
    return dropped


class JsonLog:
    """Appends strict-JSON records to a log file (nothing when ``path`` is None: MPI ranks > 0)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = path
        try:
            self.file = None if path is None else open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise OSError(exc.errno, f"{path}: {exc.strerror}") from exc

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record and flush it; an error (a full disk) names the log file."""
        if self.file is not None:
            try:
                self.file.write(json.dumps(strict(dict(record)), allow_nan=False) + "\n")
                self.file.flush()
            except OSError as exc:
                file, self.file = self.file, None
                try:
                    file.close()      # flushes again, and fails again: the error above is the one to report
                except OSError:
                    pass
                raise OSError(exc.errno, f"{self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> "JsonLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a log (strict JSON: NaN is refused)."""
    def refuse(constant: str):
        raise ValueError(f"{path}: non-standard JSON constant {constant}")

    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]
