"""The Python snippets of docs/api.md run, in order, in one session: against the shipped demo model
and a small synthetic data set written by the first snippet, in a scratch folder."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_api_snippets_run(jt, tmp_path, monkeypatch):
    blocks = python_blocks(REPO / "docs" / "api.md")
    assert len(blocks) >= 8
    (tmp_path / "checkpoints").symlink_to(REPO / "checkpoints")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_doc"}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/api.md block {number}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"docs/api.md block {number} failed: {exc!r}\n{block}") from exc
