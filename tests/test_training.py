"""The LDM training loop on a tiny U-Net and an 8x12 latent store: learning, EMA math, bit-exact
resume, atomic checkpoints, the NaN guard, gradient accumulation, mask dropout, the CLI (MPI: tests/test_mpi.py)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

C, H, W = 3, 8, 12
REPO = Path(__file__).resolve().parents[1]


def write_store(path: Path, count: int = 6, seed: int = 0) -> Path:
    """A complete latent store written directly (no autoencoder): smooth latents whose values
    follow the label, so that the mask carries information about x_0."""
    from ldm.latents import FORMAT_NAME, FORMAT_VERSION, write_json_atomic

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    labels = np.zeros((count, 2, H, W), np.uint8)
    latents = np.zeros((count, 2, C, H, W), np.float32)
    for i in range(count):
        horizon = rng.integers(2, H - 2)
        label = np.where(np.arange(H)[:, None] < horizon, 1, rng.integers(2, 6)).repeat(W, axis=1).astype(np.uint8)
        label[:, : rng.integers(1, W // 2)] = np.where(label[:, : 1] == 1, 1, 5)
        for view, lab in enumerate((label, label[:, ::-1])):
            labels[i, view] = lab
            latents[i, view] = (np.stack([np.sin(lab * 0.7), np.cos(lab * 0.5), lab / 10.0 - 0.3]) +
                                0.05 * rng.standard_normal((C, H, W))).astype(np.float32)
    np.save(path / "latents.npy", latents)
    np.save(path / "labels.npy", labels)
    write_json_atomic(path / "progress.json", {"done": count})
    write_json_atomic(path / "manifest.json", {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "count": count, "names": [f"{i}" for i in range(count)],
        "latent": {"channels": C, "height": H, "width": W}, "image": {"height": 4 * H, "width": 4 * W},
        "autoencoder_sha256": "test", "views": ["original", "hflip"]})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("latents") / "store")


def make_unet(jt, seed=0):
    from models import UNetModel, unet_preset

    jt.set_global_seed(seed)
    return UNetModel(unet_preset("tiny"))


def config(**overrides):
    from ldm.training import TrainConfig

    values = dict(batch_size=2, lr=1e-3, max_steps=4, save_every=2, sample_every=0, ema_decay=0.9)
    values.update(overrides)
    return TrainConfig(**values)


def read(path):
    from weights.checkpoint import read_checkpoint

    return read_checkpoint(path)


def param_arrays(unet):
    return {n: p.numpy().copy() for n, p in unet.named_parameters()}


# ------------------------------------------------------------------------------ numpy-only parts
def test_batches_cover_every_item_once_per_epoch():
    from ldm.training import batch_indices

    seen = np.concatenate([batch_indices(5, step, 3, 7) for step in range(7)])   # 21 = 3 epochs of 7
    for epoch in range(3):
        assert sorted(seen[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    np.testing.assert_array_equal(batch_indices(5, 4, 3, 7), seen[12:15])


def test_mask_dropout_rate_and_null_masks(store):
    from datasets import one_hot
    from ldm.latents import LatentStore
    from ldm.training import draw_batch

    latents = LatentStore(store)
    for p in (0.0, 0.3, 1.0):
        cfg = config(batch_size=4, mask_dropout=p)
        kept = []
        for step in range(250):
            batch = draw_batch(latents, cfg, step)
            full = one_hot(batch.labels)
            for j in range(4):
                if batch.kept[j]:
                    np.testing.assert_array_equal(batch.masks[j], full[j])
                else:
                    assert not batch.masks[j].any()
            kept.append(batch.kept)
        rate = 1.0 - np.mean(kept)
        n = 1000
        assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12, (p, rate)


def test_each_step_draws_the_same_batch_again(store):
    from ldm.latents import LatentStore
    from ldm.training import draw_batch

    latents = LatentStore(store)
    a, b, c = (draw_batch(latents, config(), s) for s in (3, 3, 4))
    for name in ("latents", "masks", "t", "noise"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.noise, c.noise)
    assert a.t.min() >= 0 and a.t.max() < 1000


def test_latent_scale_multiplies_the_drawn_latents_and_std_is_over_the_whole_store(store):
    from ldm.latents import LatentStore
    from ldm.training import draw_batch, latent_std

    latents = LatentStore(store)
    plain, scaled = draw_batch(latents, config(), 5), draw_batch(latents, config(latent_scale=2.5), 5)
    np.testing.assert_array_equal(scaled.latents, plain.latents * np.float32(2.5))
    np.testing.assert_array_equal(scaled.noise, plain.noise)
    every = np.load(store / "latents.npy").astype(np.float64)   # [count, 2 views, C, H, W]
    assert latent_std(latents) == pytest.approx(every.std(), rel=1e-12)
    with pytest.raises(ValueError, match="latent_scale"):
        config(latent_scale=0.0)


def test_ema_matches_the_closed_form(jt):
    from ldm.ema import EMA

    d = 0.9
    p = jt.array(np.array([1.0, -2.0], np.float32))
    ema = EMA([("p", p)], d)
    values = [np.array([1.0, -2.0])]
    rng = np.random.default_rng(0)
    for _ in range(5):
        new = rng.standard_normal(2)
        p.update(jt.array(new.astype(np.float32)))
        values.append(new)
        ema.update()
    n = len(values) - 1
    expected = d ** n * values[0] + (1 - d) * sum(d ** (n - k) * values[k] for k in range(1, n + 1))
    np.testing.assert_allclose(ema.state_dict()["p"], expected, rtol=1e-6)


# ------------------------------------------------------------------------------ the loop
def test_loss_decreases_on_a_fixed_batch(jt, store, tmp_path):
    from ldm import make_schedule
    from ldm.latents import LatentStore
    from ldm.losses import training_losses
    from ldm.training import draw_batch, train

    unet = make_unet(jt)
    latents = LatentStore(store)
    schedule = make_schedule()
    fixed = [draw_batch(latents, config(mask_dropout=0.0), 1000 + k) for k in range(4)]

    def held_out_loss():
        total = 0.0
        with jt.no_grad():
            for batch in fixed:
                mask = jt.array(batch.masks)
                terms = training_losses(schedule, lambda x, t: unet(x, t, mask), jt.array(batch.latents),
                                        jt.array(batch.t), jt.array(batch.noise))
                total += float(terms["mse"].mean().item())
        return total / len(fixed)

    before = held_out_loss()
    result = train(unet, latents, tmp_path / "run", config(max_steps=30, save_every=0, mask_dropout=0.0, lr=2e-3),
                   progress=False)
    after = held_out_loss()
    assert result["step"] == 30 and result["updates"] == 30 and result["bad_steps"] == 0
    assert after < 0.8 * before, (before, after)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert {"loss", "mse", "vb", "grad_norm", "mask_kept"} <= set(lines[0])
    np.testing.assert_allclose(lines[0]["loss"], lines[0]["mse"] + lines[0]["vb"], rtol=1e-5)


def test_ema_in_the_loop_and_checkpoint_layout(jt, store, tmp_path):
    from ldm.training import train

    unet = make_unet(jt)
    history = [param_arrays(unet)]
    train(unet, store, tmp_path / "run", config(max_steps=3, save_every=3), progress=False,
          step_hook=lambda step, record: history.append(param_arrays(unet)))
    arrays, info = read(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert info["kind"] == "unet-train"
    assert info["extra"]["step"] == 3 and info["extra"]["training"]["task"]["updates"] == 3
    assert info["config"]["network"]["model_channels"] == 16 and info["config"]["train"]["ema_decay"] == 0.9
    d = 0.9
    for name in history[0]:
        expected = d ** 3 * history[0][name].astype(np.float64) + (1 - d) * sum(
            d ** (3 - k) * history[k][name].astype(np.float64) for k in (1, 2, 3))
        np.testing.assert_allclose(arrays[f"ema/{name}"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(arrays[f"model/{name}"], history[3][name])
        assert f"optim/m/{name}" in arrays and f"optim/v/{name}" in arrays


def test_resume_is_bit_exact(jt, store, tmp_path):
    from ldm.training import train

    train(make_unet(jt), store, tmp_path / "straight", config(max_steps=4, save_every=2), progress=False)
    train(make_unet(jt), store, tmp_path / "split", config(max_steps=2, save_every=2), progress=False)
    # A fresh process would rebuild the network from another seed: the checkpoint must overwrite it all.
    result = train(make_unet(jt, seed=123), store, tmp_path / "split", config(max_steps=4, save_every=2),
                   resume=True, progress=False)
    assert result["step"] == 4
    straight, _ = read(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    split, info = read(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert info["extra"]["training"]["task"]["updates"] == 4
    assert straight.keys() == split.keys()
    for name in straight:
        np.testing.assert_array_equal(straight[name], split[name], err_msg=name)
    log = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_refuses_to_overwrite_or_resume_the_wrong_run(jt, store, tmp_path):
    from weights.checkpoint import WeightsError
    from ldm.training import train
    from models import UNetModel, unet_preset

    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(make_unet(jt), store, tmp_path / "run", config(max_steps=1), resume=True, progress=False)
    train(make_unet(jt), store, tmp_path / "run", config(max_steps=1), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(make_unet(jt), store, tmp_path / "run", config(max_steps=2), progress=False)
    other = UNetModel(unet_preset("tiny", spade_hidden_channels=8))
    with pytest.raises(WeightsError, match="network config differs"):
        train(other, store, tmp_path / "run", config(max_steps=2), resume=True, progress=False)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(jt, store, tmp_path, monkeypatch):
    from ldm.training import train

    run = tmp_path / "run"
    train(make_unet(jt), store, run, config(max_steps=2, save_every=2), progress=False)
    good = (run / "checkpoints" / "last.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        train(make_unet(jt), store, run, config(max_steps=4, save_every=2), resume=True, progress=False)
    monkeypatch.undo()
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == good
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.safetensors"]
    _, info = read(run / "checkpoints" / "last.safetensors")
    assert info["extra"]["step"] == 2


class Poisoned:
    """The tiny U-Net whose output becomes NaN while ``poison`` is set (the loop only needs
    ``__call__``, ``config``, ``named_parameters``, ``state_dict``, ``train``, ``eval``)."""

    def __init__(self, unet):
        self.unet, self.config, self.poison = unet, unet.config, False

    def __call__(self, x_t, t, mask):
        out = self.unet(x_t, t, mask)
        return out * float("nan") if self.poison else out

    def __getattr__(self, name):
        return getattr(self.unet, name)


def test_non_finite_steps_are_skipped_and_counted(jt, store, tmp_path):
    from ldm.training import train

    net = Poisoned(make_unet(jt))
    poisoned_steps = {2, 3}                 # the 2nd and 3rd steps
    seen = {}

    def hook(step, record):
        seen[step] = (param_arrays(net.unet), record)
        net.poison = (step + 1) in poisoned_steps

    before = param_arrays(net.unet)
    result = train(net, store, tmp_path / "run", config(max_steps=5, save_every=0, max_bad_steps=3),
                   progress=False, step_hook=hook)
    assert result["step"] == 5 and result["bad_steps"] == 2 and result["updates"] == 3
    assert seen[2][1]["skipped"] == "non_finite" and seen[3][1]["skipped"] == "non_finite"
    assert "skipped" not in seen[4][1]
    for name in before:
        np.testing.assert_array_equal(seen[3][0][name], seen[1][0][name])    # nothing moved while poisoned
    assert any(not np.array_equal(seen[4][0][n], seen[3][0][n]) for n in before)
    _, info = read(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert info["extra"]["training"]["bad_steps"] == 2 and info["extra"]["training"]["task"]["updates"] == 3


def test_k_non_finite_steps_in_a_row_stop_the_run(jt, store, tmp_path):
    from ldm.training import TrainingStopped, train

    net = Poisoned(make_unet(jt))

    def hook(step, record):
        net.poison = step >= 2

    # Step 2 (finite) proves the checkpoint of step 1; the checkpoint of step 2 is never proven.
    with pytest.raises(TrainingStopped, match=r"stopped at step 5: 3 steps in a row had a non-finite loss.*"
                                              r"last good checkpoint is .*last.safetensors \(step 1\)"):
        train(net, store, tmp_path / "run", config(max_steps=20, save_every=1, max_bad_steps=3),
              progress=False, step_hook=hook)
    _, info = read(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert info["extra"]["training"]["task"]["updates"] == 1 and info["extra"]["step"] == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "diverged.safetensors", "last.safetensors"]


def test_gradient_accumulation_matches_the_full_batch(jt, store, tmp_path):
    from ldm.training import train

    runs = {}
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        train(make_unet(jt), store, out, config(batch_size=4, grad_accum=accum, mask_dropout=0.0, max_steps=1,
                                                save_every=1), progress=False)
        runs[accum], _ = read(out / "checkpoints" / "last.safetensors")
    for name in runs[1]:
        if name.startswith("optim/m/"):   # first moment after one step = (1 - beta1) * gradient
            np.testing.assert_allclose(runs[2][name], runs[1][name], rtol=1e-4, atol=1e-9, err_msg=name)
        elif name.startswith("model/"):
            np.testing.assert_allclose(runs[2][name], runs[1][name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_export_weights_and_reload(jt, store, tmp_path):
    from ldm.training import train
    from models import load_unet
    from tools.export_weights import main as export
    from weights.checkpoint import read_checkpoint

    train(make_unet(jt), store, tmp_path / "run", config(max_steps=1, save_every=1, latent_scale=3.0),
          progress=False)
    assert export([str(tmp_path / "run" / "checkpoints" / "last.safetensors"), str(tmp_path / "unet.safetensors")]) == 0
    arrays, info = read_checkpoint(tmp_path / "unet.safetensors")
    assert info["kind"] == "unet"
    unet, checkpoint = load_unet(tmp_path / "unet.safetensors")
    assert checkpoint.diffusion["latent_scale"] == 3.0 and checkpoint.diffusion["schedule"]["num_timesteps"] == 1000
    train_arrays, _ = read(tmp_path / "run" / "checkpoints" / "last.safetensors")
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, train_arrays[f"ema/{name}"])


def test_train_cli_ldm_stage(jt, store, tmp_path, capsys):
    import train as train_cli

    run = tmp_path / "run"
    args = ["ldm", "--latents", str(store), "--preset", "tiny", "--out", str(run), "--max_steps", "2",
            "--batch_size", "2", "--save_every", "1", "--sample_every", "0", "--cpu"]
    assert train_cli.main(args) == 0
    assert "step 2" in capsys.readouterr().out
    assert train_cli.main(args[:8] + ["4"] + args[9:] + ["--resume"]) == 0
    _, info = read(run / "checkpoints" / "last.safetensors")
    assert info["extra"]["step"] == 4
    (tmp_path / "empty").mkdir()
    assert train_cli.main(["ldm", "--latents", str(tmp_path / "empty"), "--out", str(tmp_path / "x"), "--cpu"]) == 1
    assert "not a latent store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["ldm", "--latents", str(tmp_path / "none"), "--out", str(tmp_path / "x"), "--cpu"])
    assert exit_.value.code == 2 and "--latents" in capsys.readouterr().err


def test_a_resumed_run_refuses_options_that_would_change_it(jt, store, tmp_path, capsys):
    """--preset naming another network and --latent_scale are refused on --resume (exit 2, before
    anything loads) instead of being ignored; the run's own preset is accepted."""
    import train as train_cli

    run = tmp_path / "run"
    args = ["ldm", "--latents", str(store), "--out", str(run), "--batch_size", "2", "--sample_every", "0", "--cpu"]
    assert train_cli.main(args + ["--preset", "tiny", "--max_steps", "2"]) == 0
    capsys.readouterr()
    for bad, message in ((["--preset", "demo"], "--preset demo: " + str(run / "checkpoints" / "last.safetensors")
                          + " trains another network"),
                         (["--latent_scale", "2"], "--latent_scale cannot change when resuming")):
        with pytest.raises(SystemExit) as exit_:
            train_cli.main(args + ["--resume", "--max_steps", "3", *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # The store may move, but latents of another autoencoder are another latent space.
    other = write_store(tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "autoencoder_sha256": "another"}))
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(args + ["--resume", "--max_steps", "3", "--latents", str(other)])
    assert exit_.value.code == 2 and "encoded by another autoencoder" in capsys.readouterr().err
    moved = write_store(tmp_path / "moved")
    assert train_cli.main(args + ["--resume", "--max_steps", "3", "--preset", "tiny", "--latents", str(moved)]) == 0


def test_resume_keeps_the_learnt_schedule_and_scale_and_refuses_a_config_with_gaps(jt, store, tmp_path, capsys):
    """A resumed run takes its schedule and latent scale from the checkpoint's diffusion section
    (what the network learnt), and every other training field from its train section: a field
    missing there is an error naming it, never today's default."""
    import train as train_cli
    from weights.checkpoint import save_checkpoint

    run = tmp_path / "run"
    args = ["ldm", "--latents", str(store), "--out", str(run), "--batch_size", "2", "--sample_every", "0", "--cpu"]
    assert train_cli.main(args + ["--preset", "tiny", "--max_steps", "2", "--latent_scale", "1.5"]) == 0
    last = run / "checkpoints" / "last.safetensors"
    arrays, info = read(last)

    def rewrite(train):
        save_checkpoint(last, arrays, kind=info["kind"], config={**info["config"], "train": train}, extra=info["extra"])

    rewrite({**info["config"]["train"], "latent_scale": 9.0})
    assert train_cli.main(args + ["--resume", "--max_steps", "3"]) == 0
    _, resumed = read(last)
    assert resumed["config"]["train"]["latent_scale"] == resumed["config"]["diffusion"]["latent_scale"] == 1.5
    arrays, info = read(last)
    rewrite({k: v for k, v in info["config"]["train"].items() if k != "mask_dropout"})
    capsys.readouterr()
    assert train_cli.main(args + ["--resume", "--max_steps", "4"]) == 1
    assert "lacks the field(s) mask_dropout" in capsys.readouterr().err


def test_gradient_checkpointing_trains_like_the_plain_loop(jt, store, tmp_path):
    """Two steps with --grad_checkpoint give the plain loop's losses and weights (float32 rounding)."""
    from ldm.training import train

    plain = train(make_unet(jt), store, tmp_path / "plain", config(max_steps=2, save_every=2), progress=False)
    staged = train(make_unet(jt), store, tmp_path / "staged", config(max_steps=2, save_every=2, grad_checkpoint=True),
                   progress=False)
    for key in ("loss", "mse", "vb"):
        np.testing.assert_allclose(staged["last"][key], plain["last"][key], rtol=1e-4, atol=1e-7)
    a, _ = read(tmp_path / "plain" / "checkpoints" / "last.safetensors")
    b, _ = read(tmp_path / "staged" / "checkpoints" / "last.safetensors")
    for name in a:
        if name.startswith("model/"):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_diverged_run_points_at_a_checkpoint_that_resumes(jt, store, tmp_path, capsys):
    """Train to step 4; resume with a learning rate that wrecks the weights (the first step's loss
    is finite, then every step is NaN): the run stops non-zero naming the step-4 checkpoint, and
    resuming that with a sane learning rate trains without a non-finite step."""
    import train as train_cli

    run = tmp_path / "run"
    args = ["ldm", "--latents", str(store), "--preset", "tiny", "--output_path", str(run), "--batch_size", "2",
            "--sample_every", "0", "--cpu"]
    assert train_cli.main(args + ["--max_steps", "4", "--save_every", "2", "--lr", "1e-3"]) == 0
    capsys.readouterr()
    assert train_cli.main(args + ["--resume", "--max_steps", "30", "--save_every", "1", "--lr", "1e9"]) == 1
    err = capsys.readouterr().err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'last.safetensors'} (step 4)" in err, err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[4]["step"] == 5 and records[4].get("skipped") is None      # finite, but wrecking
    assert all(r["skipped"] == "non_finite" for r in records[5:]) and len(records) == 15
    _, info = read(run / "checkpoints" / "last.safetensors")
    assert info["extra"]["step"] == 4
    assert train_cli.main(args + ["--resume", "--max_steps", "8", "--lr", "1e-3"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert not any(r.get("skipped") for r in records)


def test_finite_losses_from_wrecked_weights_do_not_prove_them(jt, store, tmp_path, capsys):
    """At --lr 100 the losses grow to 1e9 and more while staying finite between NaN steps: none of
    those finite steps may promote the weights. The run stops naming the step-4 checkpoint, and
    resuming that with a sane learning rate trains without a bad step."""
    import train as train_cli

    run = tmp_path / "run"
    args = ["ldm", "--latents", str(store), "--preset", "tiny", "--output_path", str(run), "--batch_size", "2",
            "--sample_every", "0", "--cpu"]
    assert train_cli.main(args + ["--max_steps", "4", "--save_every", "2", "--lr", "1e-3"]) == 0
    capsys.readouterr()
    assert train_cli.main(args + ["--resume", "--max_steps", "40", "--save_every", "1", "--lr", "100",
                                  "--max_bad_steps", "3"]) == 1
    err = capsys.readouterr().err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'last.safetensors'} (step 4)" in err, err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("suspect") == "loss_spike" for r in records[4:])
    assert train_cli.main(args + ["--resume", "--max_steps", "12", "--lr", "1e-4"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert not any(r.get("skipped") or r.get("suspect") for r in records)


@pytest.mark.parametrize("stage", ["ldm", "autoencoder", "sdm", "segmenter"])
def test_the_seed_fixes_a_whole_run(jt, store, tmp_path, stage):
    """Two fresh runs with one seed write byte-identical checkpoints; another seed differs."""
    import train as train_cli
    from datasets.synthetic import write_dataset

    if stage == "ldm":
        data = ["--latents", str(store), "--preset", "tiny"]
    else:
        write_dataset(tmp_path / "data", 4, 24, 32, seed=0, n_test=1)
        data = ["--data", str(tmp_path / "data" / "train"), "--height", "24", "--width", "32", "--lr", "1e-3"]
        data += {"autoencoder": ["--preset", "tiny"], "sdm": ["--preset", "tiny"], "segmenter": ["--widths", "8,16"]}[stage]
    common = [stage, *data, "--batch_size", "2", "--max_steps", "2", "--save_every", "2", "--cpu"]
    if stage != "segmenter":
        common += ["--sample_every", "0"]
    files = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert train_cli.main(common + ["--output_path", str(tmp_path / name), "--seed", str(seed)]) == 0
        files[name] = (tmp_path / name / "checkpoints" / "last.safetensors").read_bytes()
    assert files["a"] == files["b"]
    a, _ = read(tmp_path / "a" / "checkpoints" / "last.safetensors")
    c, _ = read(tmp_path / "c" / "checkpoints" / "last.safetensors")
    first_conv = {"ldm": "model/input_blocks.0.0.weight", "sdm": "model/input_blocks.0.0.weight",
                  "autoencoder": "model/encoder.conv_in.weight"}.get(stage)
    if first_conv is None:
        first_conv = next(k for k in sorted(a) if k.startswith("model/") and k.endswith("conv.weight"))
    assert not np.allclose(a[first_conv], c[first_conv], atol=1e-3)   # other initial weights, not just other data


def test_init_starts_an_ldm_run_from_given_weights(jt, store, tmp_path, capsys):
    """--init takes the checkpoint's weights, schedule and latent scale (a fine-tuning run); the
    first step with a tiny learning rate leaves the weights where they were."""
    import dataclasses

    import train as train_cli
    from ldm.schedule import ScheduleConfig
    from weights.checkpoint import diffusion_section, module_arrays, save_checkpoint

    unet = make_unet(jt, seed=3)
    start = module_arrays(unet)
    schedule = dataclasses.asdict(ScheduleConfig(num_timesteps=500))
    save_checkpoint(tmp_path / "start.safetensors", start, "unet",
                    {"network": unet.config.to_dict(), "diffusion": diffusion_section(schedule, "latent", 1.7)})
    common = ["ldm", "--latents", str(store), "--init", str(tmp_path / "start.safetensors"), "--batch_size", "2",
              "--max_steps", "1", "--save_every", "1", "--sample_every", "0", "--cpu"]
    assert train_cli.main(common + ["--output_path", str(tmp_path / "run"), "--lr", "1e-12"]) == 0
    arrays, info = read(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert info["config"]["diffusion"]["latent_scale"] == 1.7
    assert info["config"]["diffusion"]["schedule"]["num_timesteps"] == 500
    assert info["config"]["network"] == unet.config.to_dict()
    for name, value in start.items():
        np.testing.assert_allclose(arrays[f"model/{name}"], value, atol=1e-9, err_msg=name)
    for bad, message in ((["--preset", "demo"], "another network than --preset demo"),
                         (["--latent_scale", "2"], "--latent_scale cannot change with --init")):
        with pytest.raises(SystemExit) as exit_:       # refused before anything loads
            train_cli.main(common + ["--output_path", str(tmp_path / "x"), *bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(common + ["--output_path", str(tmp_path / "run"), "--resume"])
    assert exit_.value.code == 2 and "--init starts a new run" in capsys.readouterr().err
