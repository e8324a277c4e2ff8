"""Entry points are thin `main(argv)` functions; until a model exists infer.py says so plainly."""

import pytest

import infer


def test_infer_without_a_model_says_so_and_generates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "DEMO_CHECKPOINT", tmp_path / "absent.safetensors")
    status = infer.main(["--cpu", "--output_path", str(tmp_path / "out")])
    assert status == infer.NO_MODEL != 0
    assert "no model is available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_infer_names_a_missing_checkpoint_before_anything_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer.jittor_env, "setup", lambda **kw: pytest.fail("Jittor set up before the check"))
    for args, named in ((["--ckpt", str(tmp_path / "nope.safetensors")], "nope.safetensors: not found"),
                        (["--ckpt", __file__], "vq.safetensors: not found (the autoencoder beside the first --ckpt)"),
                        (["--ckpt", __file__, "--vq", str(tmp_path / "vq.pt")], "vq.pt: not found")):
        with pytest.raises(SystemExit) as exit_:
            infer.main(["--cpu", *args])
        assert exit_.value.code == 2 and named in capsys.readouterr().err



@pytest.mark.parametrize("stage, options, message", [
    ("ldm", ["--preset", "huge"], "--preset huge: not a latent U-Net preset; choose one of iidm, demo, tiny"),
    ("autoencoder", ["--preset", "huge"], "--preset huge: not an autoencoder preset"),
    ("segmenter", ["--preset", "tiny"], "--preset: not an option of the segmenter stage"),
    ("segmenter", ["--sample_every", "5"], "--sample_every: not an option of the segmenter stage"),
    ("ldm", ["--latent_scale", "abc"], "--latent_scale must be a number or 'auto'"),
    ("ldm", ["--latent_scale", "0"], "--latent_scale must be a finite number > 0"),
    ("ldm", ["--mask_dropout", "1.5"], "--mask_dropout must be in [0, 1]"),
    ("ldm", ["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
    ("ldm", ["--fp16", "--cpu"], "--fp16 needs CUDA"),
    ("autoencoder", ["--latents", "."], "--latents: not an option of the autoencoder stage"),
    ("ldm", ["--seed", "-1"], "--seed must be >= 0"),
    ("ldm", ["--lr", "inf"], "--lr must be a finite number > 0"),
    ("ldm", ["--batch_size", "3", "--grad_accum", "2"], "--batch_size 3 does not split into --grad_accum 2"),
    ("segmenter", ["--widths", "0,16"], "--widths must be comma-separated integers >= 1"),
    ("autoencoder", ["--height", "25"], "--height 25 is not a multiple of the autoencoder's downsampling factor 4"),
    ("sdm", ["--height", "30"], "--height 30 is not a multiple of 4, which the sdm-demo U-Net needs"),
    ("sdm", ["--preset", "nope"], "--preset nope: not a U-Net preset; choose one of "),
])
def test_train_refuses_bad_options_before_any_model_loads(jt, tmp_path, capsys, monkeypatch, stage, options, message):
    import train

    def refuse(args):
        raise AssertionError("a stage started before the options were checked")

    for name in ("autoencoder_stage", "ldm_stage", "segmenter_stage", "sdm_stage"):
        monkeypatch.setattr(train, name, refuse)
    data = {"ldm": ["--latents", str(tmp_path)], "autoencoder": ["--data", str(tmp_path)],
            "segmenter": ["--data", str(tmp_path)], "sdm": ["--data", str(tmp_path)]}[stage]
    with pytest.raises(SystemExit) as exit_:
        train.main([stage, *data, "--output_path", str(tmp_path / "run"), "--cpu", *options])
    err = capsys.readouterr().err
    assert exit_.value.code == train.USAGE and message in err
    assert len([line for line in err.splitlines() if ": error: " in line]) == 1
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_file_as_its_run_folder(tmp_path, capsys):
    import train

    # and a resume with nothing to resume says so, not what its defaults would be
    assert train.main(["ldm", "--output_path", str(tmp_path / "none"), "--resume", "--grad_accum", "2", "--cpu"]) == 1
    assert "nothing to resume" in capsys.readouterr().err

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        train.main(["ldm", "--latents", str(tmp_path), "--output_path", str(tmp_path / "file"), "--cpu"])
    assert exit_.value.code == 2 and "a file, not a run folder" in capsys.readouterr().err
