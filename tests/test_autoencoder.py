"""The VQ autoencoder: shapes, the quantizer against numpy, the straight-through gradient, the
adaptive GAN weight against gradient norms computed independently, and training (loss goes down,
resume continues exactly, train.py's autoencoder stage).

Every network here is the tiny preset on 24x32 (HxW) images, batch 2, so the kernels compile once.
"""

import json

import numpy as np
import pytest

HEIGHT, WIDTH, BATCH = 24, 32, 2


def images(seed=0, batch=BATCH):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, HEIGHT, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(jt):
    from autoencoder.vqmodel import VQModel, vq_config

    jt.set_global_seed(0)
    return VQModel(vq_config("tiny"))


def test_latent_is_a_quarter_of_the_image_per_side(jt, tiny):
    x = jt.array(images())
    latent = tiny.encode(x)
    assert tuple(latent.shape) == (BATCH, 3, HEIGHT // 4, WIDTH // 4)
    assert latent.dtype == "float32"
    assert tuple(tiny.decode(latent).shape) == (BATCH, 3, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="multiples of 4, got height=26, width=32"):
        tiny.encode(jt.zeros((1, 3, 26, 32)))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        tiny.encode(jt.zeros((1, 4, 24, 32)))


def _attention_float64(block, x):
    """The autoencoder's attention block in float64 numpy: GroupNorm (eps 1e-6), 1x1 q, k, v,
    softmax(q^T k / sqrt(C)) over the positions, v times the weights, 1x1 proj_out, residual."""
    p = {name: v.numpy().astype(np.float64) for name, v in block.state_dict().items()}
    x = x.astype(np.float64)
    b, c, height, width = x.shape
    g = block.norm.num_groups
    grouped = x.reshape(b, g, -1)
    h = ((grouped - grouped.mean(2, keepdims=True)) / np.sqrt(grouped.var(2, keepdims=True) + 1e-6)).reshape(x.shape)
    h = h * p["norm.weight"][:, None, None] + p["norm.bias"][:, None, None]
    conv = lambda name, y: np.einsum("oc,bcn->bon", p[name + ".weight"][:, :, 0, 0], y) + p[name + ".bias"][:, None]
    flat = h.reshape(b, c, -1)
    q, k, v = conv("q", flat), conv("k", flat), conv("v", flat)
    logits = np.einsum("bcn,bcm->bnm", q, k) / np.sqrt(c)
    weights = np.exp(logits - logits.max(2, keepdims=True))
    weights /= weights.sum(2, keepdims=True)
    out = np.einsum("bnm,bcm->bcn", weights, v)
    return x + conv("proj_out", out).reshape(x.shape)


def test_attention_block_matches_float64_numpy(jt):
    from autoencoder.modules import AttnBlock
    from models.layers import use_kernels

    jt.set_global_seed(3)
    block = AttnBlock(32, num_groups=8)
    x = np.random.default_rng(4).standard_normal((BATCH, 32, 6, 8)).astype(np.float32)
    expected = _attention_float64(block, x)
    grads = []
    for enabled in (True, False):          # the CPU kernels and the plain Jittor ops
        with use_kernels(enabled):
            xv = jt.array(x)
            out = block(xv)
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
            grads.append(jt.grad((out * out).sum(), xv).numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-3, atol=1e-3)


def test_decode_quantizes_first(jt, tiny):
    latent = tiny.encode(jt.array(images()))
    z_q, indices, _ = tiny.quantize(latent)
    np.testing.assert_allclose(tiny.decode(latent).numpy(), tiny.decode_quantized(z_q).numpy(), atol=1e-6)
    np.testing.assert_allclose(tiny.decode_code(indices).numpy(), tiny.decode_quantized(z_q).numpy(), atol=1e-5)


def _codebook_case(seed=0):
    """Latents [2, 3, 6, 8] and a codebook [16, 3] whose nearest codes are unambiguous in float32."""
    rng = np.random.default_rng(seed)
    codebook = rng.standard_normal((16, 3))
    z = rng.standard_normal((2, 3, 6, 8))
    flat = z.transpose(0, 2, 3, 1).reshape(-1, 3)
    distances = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1)
    nearest = np.sort(distances, axis=1)
    assert (nearest[:, 1] - nearest[:, 0]).min() > 1e-4  # no near-ties: the test can decide
    return z.astype(np.float32), codebook.astype(np.float32), distances.argmin(1).reshape(2, 6, 8)


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_matches_numpy_brute_force(jt, legacy):
    from autoencoder.quantize import VectorQuantizer

    z_np, codebook_np, expected_codes = _codebook_case()
    beta = 0.25
    quantizer = VectorQuantizer(16, 3, beta=beta, legacy=legacy)
    quantizer.embedding.weight.update(jt.array(codebook_np))
    z = jt.array(z_np)
    z_q, codes, loss = quantizer(z)
    np.testing.assert_array_equal(codes.numpy(), expected_codes)
    z_q_np = codebook_np.astype(np.float64)[expected_codes].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(z_q.numpy(), z_q_np, atol=1e-6)
    mse = ((z_q_np - z_np.astype(np.float64)) ** 2).mean()
    np.testing.assert_allclose(loss.item(), (1 + beta) * mse, rtol=1e-5)

    # Gradients: legacy pulls the encoder with weight 1 and the codebook with beta, the paper's
    # weighting the other way round; d mean((a - b)^2) / da = 2 (a - b) / N.
    encoder_weight, codebook_weight = (1.0, beta) if legacy else (beta, 1.0)
    n = z_np.size
    grad_z, grad_codebook = jt.grad(loss, [z, quantizer.embedding.weight])
    np.testing.assert_allclose(grad_z.numpy(), encoder_weight * 2 * (z_np - z_q_np) / n, atol=1e-7)
    expected_codebook_grad = np.zeros((16, 3))
    diff = (z_q_np - z_np).transpose(0, 2, 3, 1).reshape(-1, 3)
    np.add.at(expected_codebook_grad, expected_codes.reshape(-1), codebook_weight * 2 * diff / n)
    np.testing.assert_allclose(grad_codebook.numpy(), expected_codebook_grad, atol=1e-7)

    # Straight through: d sum(c * z_q) / dz = c.
    c = np.random.default_rng(1).standard_normal(z_np.shape).astype(np.float32)
    np.testing.assert_allclose(jt.grad((z_q * jt.array(c)).sum(), z).numpy(), c, atol=1e-6)


def test_straight_through_gradient_reaches_the_encoder(jt, tiny):
    x = jt.array(images())
    reconstruction, _, _ = tiny(x)
    l1 = (reconstruction - x).abs().mean()
    names = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.mid.attn_1.q.weight",
             "encoder.conv_out.weight", "quant_conv.weight"]
    params = dict(tiny.named_parameters())
    grads = jt.grad(l1, [params[n] for n in names])
    for name, grad in zip(names, grads):
        assert np.abs(grad.numpy()).max() > 0, f"no gradient reaches {name}"


def _conv_weight_grad(h, out_grad):
    """d L / d W of a 3x3 convolution (padding 1) from its input h [B, C, H, W] and d L / d out [B, O, H, W]."""
    b, c, height, width = h.shape
    padded = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    grad = np.zeros((out_grad.shape[1], c, 3, 3))
    for i in range(3):
        for j in range(3):
            grad[:, :, i, j] = np.einsum("bohw,bchw->oc", out_grad, padded[:, :, i:i + height, j:j + width])
    return grad


def test_adaptive_weight_is_the_ratio_of_gradient_norms(jt):
    from autoencoder.losses import adaptive_weight, hinge_d_loss

    rng = np.random.default_rng(3)
    h = rng.standard_normal((2, 4, 5, 6))                    # input of the last layer
    w = 0.3 * rng.standard_normal((3, 4, 3, 3))              # the last layer's weight
    x = rng.uniform(-1, 1, (2, 3, 5, 6))
    a = np.array([0.5, -1.0, 2.0])                           # a linear critic: D(x) = sum_c a_c x_c
    weight = jt.array(w.astype(np.float32))
    reconstruction = jt.nn.conv2d(jt.array(h.astype(np.float32)), weight, padding=1)
    nll = (jt.array(x.astype(np.float32)) - reconstruction).abs().mean()
    g_loss = -(reconstruction * jt.array(a.reshape(1, 3, 1, 1).astype(np.float32))).sum(dim=1).mean()
    got = adaptive_weight(nll, g_loss, weight, disc_weight=0.75).item()

    rec = reconstruction.numpy().astype(np.float64)
    nll_grad = _conv_weight_grad(h, np.sign(rec - x) / x.size)             # d mean|x - r| / dr = sign(r - x) / N
    g_grad = _conv_weight_grad(h, -np.broadcast_to(a.reshape(1, 3, 1, 1), rec.shape) / (2 * 5 * 6))
    expected = 0.75 * np.clip(np.linalg.norm(nll_grad) / (np.linalg.norm(g_grad) + 1e-4), 0, 1e4)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    real, fake = rng.standard_normal(7), rng.standard_normal(7)
    expected_hinge = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
    np.testing.assert_allclose(hinge_d_loss(jt.array(real), jt.array(fake)).item(), expected_hinge, rtol=1e-6)


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    from datasets import save_image, save_label

    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    try:
        from datasets.synthetic import make_scene
        scenes = [make_scene(rng, HEIGHT, WIDTH)[:2] for _ in range(8)]
    except ImportError:
        scenes = [(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8),
                   np.zeros((HEIGHT, WIDTH), np.uint8)) for _ in range(8)]
    for i, (image, label) in enumerate(scenes):
        save_image(root / "imgs" / f"{i:03d}.png", image)
        save_label(root / "labels" / f"{i:03d}.png", label)
    return root


STEPS, DISC_START = 12, 10


def _train(root, out, max_steps, resume=False):
    from autoencoder.losses import LossConfig
    from autoencoder.training import AutoencoderTrainConfig, train_autoencoder
    from autoencoder.vqmodel import vq_config

    return train_autoencoder(root, out, vq_config("tiny"), LossConfig(disc_start=DISC_START),
                             AutoencoderTrainConfig(height=HEIGHT, width=WIDTH, batch_size=BATCH, lr=2e-3,
                                                    max_steps=max_steps, sample_every=4, save_every=4, seed=0),
                             resume=resume, progress=False)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(jt, train_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    _train(train_root, run, STEPS)
    return run


def test_training_lowers_the_reconstruction_loss(full_run):
    log = _log(full_run)
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))
    for entry in log:
        assert {"total_loss", "l1_loss", "p_loss", "rec_loss", "quant_loss", "g_loss", "d_weight",
                "disc_factor"} <= set(entry)
    # Batches of 2 from 8 images: steps 1-4 and 5-8 each show every image once.
    first, second = [np.mean([e["l1_loss"] for e in log[s:s + 4]]) for s in (0, 4)]
    assert second < 0.9 * first
    # The discriminator joins at DISC_START (0-based step), i.e. from logged step DISC_START + 1.
    assert all(e["disc_factor"] == 0 and e["d_weight"] == 0 and "disc_loss" not in e for e in log[:DISC_START])
    assert all(e["disc_factor"] == 1 and e["d_weight"] > 0 and "disc_loss" in e for e in log[DISC_START:])
    assert sorted(p.name for p in (full_run / "samples").iterdir()) == [
        "step_0000004.png", "step_0000008.png", "step_0000012.png"]


def test_resume_continues_from_the_saved_step(jt, train_root, full_run, tmp_path):
    from autoencoder.vqmodel import load_vqmodel
    from weights.checkpoint import module_arrays, read_checkpoint
    from train import main

    run = tmp_path / "run"
    argv = ["autoencoder", "--data", str(train_root), "--out", str(run), "--preset", "tiny", "--height", str(HEIGHT),
            "--width", str(WIDTH), "--batch_size", str(BATCH), "--lr", "2e-3", "--disc_start", str(DISC_START),
            "--sample_every", "4", "--save_every", "4"]
    assert main(argv + ["--max_steps", "8"]) == 0
    assert read_checkpoint(run / "checkpoints" / "last.safetensors")[1]["extra"]["step"] == 8
    assert main(argv + ["--max_steps", str(STEPS)]) == 1          # the run exists: --resume is required
    assert main(argv[:5] + ["--max_steps", str(STEPS), "--resume"]) == 0  # preset, sizes... stored in the run
    log = _log(run)
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    reference = _log(full_run)
    for ours, theirs in zip(log, reference):
        for key in ("l1_loss", "quant_loss", "total_loss"):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
    resumed = module_arrays(load_vqmodel(run / "checkpoints" / "last.safetensors"))
    uninterrupted = module_arrays(load_vqmodel(full_run / "checkpoints" / "last.safetensors"))
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_train_py_refusals(train_root, tmp_path, capsys):
    from train import main

    assert main(["autoencoder", "--data", str(train_root), "--out", str(tmp_path / "none"), "--resume",
                 "--preset", "tiny"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["autoencoder", "--data", str(train_root), "--out", str(tmp_path / "x"), "--preset", "tiny",
              "--lpips_vgg", "vgg16.pth"])
    assert exit_.value.code == 2 and "LPIPS needs both weight files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["autoencoder", "--data", str(train_root), "--out", str(tmp_path / "x"), "--latents", str(train_root)])
    assert "--latents: not an option of the autoencoder stage" in capsys.readouterr().err


def test_restart_dead_codes_sets_unused_codes_to_encoder_outputs(jt, tiny):
    from autoencoder.training import restart_dead_codes

    x = jt.array(images(5))
    before = tiny.quantize.embedding.weight.numpy().copy()
    usage = np.zeros(len(before), np.int64)
    usage[::3] = 7                                   # every third code was chosen: it must stay
    try:
        replaced = restart_dead_codes(tiny, x, usage, np.random.default_rng(0))
        after = tiny.quantize.embedding.weight.numpy()
        z = tiny.encode(x).numpy()
    finally:
        tiny.quantize.embedding.weight.update(jt.array(before))
    vectors = z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])   # 2 x 6 x 8 = 96 >= the dead codes
    dead = np.flatnonzero(usage == 0)
    assert replaced == len(dead)
    np.testing.assert_array_equal(after[usage > 0], before[usage > 0])
    rows = [int(np.flatnonzero((vectors == after[k]).all(axis=1))[0]) for k in dead]  # IndexError if not a vector
    assert len(set(rows)) == len(rows)               # drawn without replacement


def test_codebook_restart_initialises_from_data_and_resumes_exactly(jt, train_root, tmp_path):
    from autoencoder.vqmodel import load_vqmodel
    from weights.checkpoint import module_arrays
    from train import main

    def argv(run, steps):
        return ["autoencoder", "--data", str(train_root), "--out", str(run), "--preset", "tiny", "--height",
                str(HEIGHT), "--width", str(WIDTH), "--batch_size", str(BATCH), "--lr", "2e-3", "--disc_start",
                "1000", "--sample_every", "0", "--save_every", "2", "--codebook_restart", "3",
                "--max_steps", str(steps)]

    assert main(argv(tmp_path / "whole", 7)) == 0
    assert main(argv(tmp_path / "split", 4)) == 0
    assert main(["autoencoder", "--data", str(train_root), "--out", str(tmp_path / "split"), "--resume",
                 "--max_steps", "7"]) == 0
    whole, split = _log(tmp_path / "whole"), _log(tmp_path / "split")
    assert whole[0]["codes_restarted"] == 64         # step 0: the whole codebook comes from data
    assert [e.get("codes_restarted") is not None for e in whole] == [True, False, False, True, False, False, True]
    for ours, theirs in zip(split, whole):
        assert ours["codes_used"] == theirs["codes_used"] and ours.get("codes_restarted") == theirs.get("codes_restarted")
        np.testing.assert_allclose(ours["l1_loss"], theirs["l1_loss"], rtol=1e-4, atol=1e-6)
    a = module_arrays(load_vqmodel(tmp_path / "whole" / "checkpoints" / "last.safetensors"))
    b = module_arrays(load_vqmodel(tmp_path / "split" / "checkpoints" / "last.safetensors"))
    np.testing.assert_allclose(b["quantize.embedding.weight"], a["quantize.embedding.weight"], rtol=1e-4, atol=1e-6)


def test_resume_is_bit_exact_discriminator_statistics_included(jt, tmp_path):
    """3 + 3 resumed steps write the same bytes as 6 straight ones: weights, the discriminator's
    BatchNorm running statistics, both Adams' moments."""
    from datasets.synthetic import write_dataset
    from train import main
    from weights.checkpoint import read_checkpoint

    write_dataset(tmp_path / "data", 4, 24, 32, seed=0, n_test=1)
    common = ["autoencoder", "--data", str(tmp_path / "data" / "train"), "--preset", "tiny", "--height", "24",
              "--width", "32", "--batch_size", "2", "--lr", "1e-3", "--sample_every", "0", "--save_every", "3",
              "--disc_start", "0", "--cpu"]
    assert main(common + ["--output_path", str(tmp_path / "whole"), "--max_steps", "6"]) == 0
    assert main(common + ["--output_path", str(tmp_path / "split"), "--max_steps", "3"]) == 0
    assert main(["autoencoder", "--output_path", str(tmp_path / "split"), "--resume", "--max_steps", "6", "--cpu"]) == 0
    whole, _ = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    split, _ = read_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert whole.keys() == split.keys() and any(k.startswith("disc/") and "running_mean" in k for k in whole)
    for name in whole:
        np.testing.assert_array_equal(split[name], whole[name], err_msg=name)


def test_a_non_finite_discriminator_loss_skips_the_whole_step(jt, monkeypatch):
    """The discriminator's loss comes after the autoencoder's gradients; when it is not finite the
    step is skipped and neither network changes (the autoencoder was updated before it, once), not
    even the discriminator's BatchNorm running statistics, which its forward passes moved."""
    from autoencoder.losses import LossConfig
    from autoencoder.training import AutoencoderTask, AutoencoderTrainConfig
    from autoencoder.vqmodel import vq_config
    from weights.checkpoint import module_arrays

    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(4)]
    task = AutoencoderTask(photos, vq_config("tiny"), LossConfig(disc_start=0),
                           AutoencoderTrainConfig(height=24, width=32, batch_size=2, lr=1e-3, seed=0))
    task.step(0)                                   # a finite step: both networks move
    before = {**module_arrays(task.model), **{f"disc/{k}": v for k, v in module_arrays(task.loss.discriminator).items()}}
    real = task.loss.discriminator_loss

    def nan_loss(*args):
        total, terms = real(*args)
        return total * float("nan"), terms

    monkeypatch.setattr(task.loss, "discriminator_loss", nan_loss)
    values = task.checked_step(1)
    assert values["skipped"] == "non_finite"
    after = {**module_arrays(task.model), **{f"disc/{k}": v for k, v in module_arrays(task.loss.discriminator).items()}}
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert any("running_mean" in k for k in before)
    monkeypatch.setattr(task.loss, "discriminator_loss", real)
    assert "skipped" not in task.checked_step(2)
    moved = {k for k, v in module_arrays(task.loss.discriminator).items() if not np.array_equal(before[f"disc/{k}"], v)}
    assert any("running_mean" in k for k in moved)     # a step that is taken does move them


def test_a_skipped_step_undoes_its_codebook_restart(jt, monkeypatch):
    """A codebook restart happens before the forward pass; when that step is then skipped, the
    codebook and the usage counts are as they were before it."""
    from autoencoder.losses import LossConfig
    from autoencoder.training import AutoencoderTask, AutoencoderTrainConfig
    from autoencoder.vqmodel import vq_config

    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(4)]
    task = AutoencoderTask(photos, vq_config("tiny"), LossConfig(disc_start=0),
                           AutoencoderTrainConfig(height=24, width=32, batch_size=2, lr=1e-3, codebook_restart=2))
    task.checked_step(0)
    task.checked_step(1)
    task.usage[:5] = 0                               # as if five codes were unused: step 2 restarts them
    codebook, usage = task.model.quantize.embedding.weight.numpy().copy(), task.usage.copy()
    real = task.loss.discriminator_loss
    monkeypatch.setattr(task.loss, "discriminator_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    assert task.checked_step(2)["skipped"] == "non_finite"
    np.testing.assert_array_equal(task.model.quantize.embedding.weight.numpy(), codebook)
    np.testing.assert_array_equal(task.usage, usage)
    monkeypatch.setattr(task.loss, "discriminator_loss", real)
    assert task.checked_step(2)["codes_restarted"] == 5.0
    assert not np.array_equal(task.model.quantize.embedding.weight.numpy()[:5], codebook[:5])


def test_a_diverging_autoencoder_run_points_at_weights_that_train_on(jt, train_root, tmp_path, capsys):
    """At --lr 1 the reconstruction loss only grows a few times while the codebook and
    discriminator losses grow a thousandfold: the guard watches all three, so the run stops naming
    the step-4 checkpoint, and resuming that at a sane rate trains with no bad step."""
    import json

    import train

    run = tmp_path / "run"
    args = ["autoencoder", "--data", str(train_root), "--output_path", str(run), "--preset", "tiny", "--height",
            str(HEIGHT), "--width", str(WIDTH), "--batch_size", "2", "--disc_start", "0", "--sample_every", "0",
            "--cpu"]
    assert train.main(args + ["--max_steps", "4", "--save_every", "2"]) == 0
    capsys.readouterr()
    assert train.main(args + ["--resume", "--lr", "1", "--save_every", "1", "--max_bad_steps", "3",
                              "--max_steps", "30"]) == 1
    err = capsys.readouterr().err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'last.safetensors'} (step 4)" in err, err
    assert "(last rec_loss" in err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[5]["suspect"] == "loss_spike" and records[5]["spiking"] in ("quant_loss", "disc_loss")
    assert train.main(args + ["--resume", "--lr", "1e-4", "--max_steps", "12"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert not any(r.get("skipped") or r.get("suspect") for r in records)


def test_resuming_keeps_the_size_and_the_learning_rate(jt, train_root, tmp_path, capsys):
    """A resumed autoencoder run refuses another --height/--width (exit 2), and another
    --batch_size does not silently rescale the default learning rate (4.5e-6 x batch size)."""
    import train
    from weights.checkpoint import read_checkpoint_info

    run = tmp_path / "run"
    args = ["autoencoder", "--data", str(train_root), "--output_path", str(run), "--preset", "tiny", "--height",
            str(HEIGHT), "--width", str(WIDTH), "--sample_every", "0", "--cpu"]
    assert train.main(args + ["--batch_size", "2", "--max_steps", "2", "--save_every", "2"]) == 0
    resume = ["autoencoder", "--output_path", str(run), "--resume", "--cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train.main(resume + ["--height", str(2 * HEIGHT), "--max_steps", "3"])
    assert exit_.value.code == 2 and f"trained with --height {HEIGHT}" in capsys.readouterr().err
    assert train.main(resume + ["--batch_size", "4", "--max_steps", "3"]) == 0
    config = read_checkpoint_info(run / "checkpoints" / "last.safetensors")["config"]
    assert config["train"]["batch_size"] == 4 and config["learning_rate"] == pytest.approx(4.5e-6 * 2)
