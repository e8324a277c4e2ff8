"""Entry points are thin `main(argv)` functions; until a model exists infer.py says so plainly."""

import infer


def test_infer_without_a_model_says_so_and_generates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "DEMO_CHECKPOINT", tmp_path / "absent.safetensors")
    status = infer.main(["--cpu", "--output_path", str(tmp_path / "out")])
    assert status == infer.NO_MODEL != 0
    assert "no model is available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_infer_names_a_missing_checkpoint(tmp_path, capsys):
    status = infer.main(["--cpu", "--ckpt", str(tmp_path / "nope.safetensors")])
    assert status == 1
    assert "nope.safetensors" in capsys.readouterr().err
