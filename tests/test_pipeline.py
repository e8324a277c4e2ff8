"""The inference pipeline as data: the presets against the official recipe written out here, and
the round chain (through the Generator's encode and decode, with a closed-form network and an
identity autoencoder) against a float64 numpy chain. The solver presets' accuracy is measured in
tests/test_oracle.py."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ldm.pipeline import (PRESETS, Round, check_rounds, fast_rounds, fastest_rounds, iidm_rounds,
                          image_seed, preset_rounds, pure_noise_rounds, run_rounds, unet_passes)
from ldm.respace import Stage
from ldm.schedule import ScheduleConfig, make_schedule
from synthesis.generator import Generator

ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # the linear schedule, from its definition
B, H, W, K = 3, 4, 6, 29


@pytest.fixture(scope="module")
def sched():
    return make_schedule(ScheduleConfig())


# ----------------------------------------------------------------------------------- presets
def test_iidm_preset_is_design_section_5():
    # The official recipe: (spacing stride, start index, guidance); the official loop noises to
    # index * stride and visits indices start-1 .. 0, i.e. timesteps (start-1)*stride .. 0.
    table = [(2, 300, 3.5, "reference", False), (2, 320, 3.7, "previous", True),
             (20, 20, 3.7, "previous", True)]
    rounds = iidm_rounds()
    assert len(rounds) == 3
    for rnd, (stride, start, scale, source, transfer) in zip(rounds, table):
        assert rnd.stage.start_level == start * stride
        assert rnd.stage.timesteps == tuple(stride * k for k in range(start - 1, -1, -1))
        assert rnd.guidance_scale == scale
        assert (rnd.start, rnd.color_transfer, rnd.sampler, rnd.eta) == (source, transfer, "ddim", 0.0)
    assert [r.stage.start_level for r in rounds] == [600, 640, 400]
    assert [len(r.stage.timesteps) for r in rounds] == [300, 320, 20]
    assert unet_passes(rounds) == 2 * (300 + 320 + 20) == 1280


def _lambda(t):
    return 0.5 * np.log(ABAR[t] / (1 - ABAR[t]))


@pytest.mark.parametrize("name, samplers, steps, passes", [
    ("fast", ("dpm_solver_pp_3m", "dpm_solver_pp_3m", "unipc"), (12, 12, 6), 60),
    ("fastest", ("unipc", "unipc", "unipc"), (5, 5, 5), 30)])
def test_solver_presets(sched, name, samplers, steps, passes):
    rounds = preset_rounds(name, sched)
    assert rounds == {"fast": fast_rounds, "fastest": fastest_rounds}[name](sched)
    assert [r.stage.start_level for r in rounds] == [600, 640, 400]
    assert tuple(r.sampler for r in rounds) == samplers
    assert tuple(r.stage.num_steps for r in rounds) == steps
    assert [r.guidance_scale for r in rounds] == [3.5, 3.7, 3.7]
    assert [(r.start, r.color_transfer) for r in rounds] == [("reference", False), ("previous", True),
                                                             ("previous", True)]
    for rnd in rounds:
        ts = rnd.stage.timesteps
        # from the level it noised to down to t = 4, evenly in lambda up to rounding to timesteps
        assert ts[0] == rnd.stage.start_level and ts[-1] == 4
        lam = _lambda(np.array(ts))
        targets = np.linspace(lam[0], lam[-1], len(ts))
        for t, target in zip(ts, targets):
            assert _lambda(min(t + 1, 999)) - 1e-9 <= target <= _lambda(max(t - 1, 0)) + 1e-9
    assert unet_passes(rounds) == passes
    assert unet_passes(rounds) / unet_passes(iidm_rounds()) <= 1 / 20


def test_steps_per_round(sched):
    assert [r.stage.num_steps for r in preset_rounds("fast", sched, steps=3)] == [3, 3, 3]
    assert unet_passes(preset_rounds("fast", sched, steps=3)) == 3 * 3 * 2
    rounds = preset_rounds("fastest", sched, steps=(8, 7, np.int64(4)))
    assert [r.stage.num_steps for r in rounds] == [8, 7, 4]
    assert unet_passes(rounds) == 2 * (8 + 7 + 4)
    assert [r.sampler for r in rounds] == ["unipc"] * 3
    assert [r.stage.num_steps for r in fast_rounds(sched, [20, 20, 20])] == [20, 20, 20]
    with pytest.raises(ValueError, match="expected 3 values"):
        preset_rounds("fast", sched, steps=(10, 10))
    with pytest.raises(ValueError, match="positive integers"):
        preset_rounds("fast", sched, steps=(10, 0, 5))
    with pytest.raises(ValueError, match="positive integers"):
        preset_rounds("fast", sched, steps=(10, 2.5, 5))
    with pytest.raises(TypeError, match="an int or a sequence"):
        preset_rounds("fast", sched, steps=10.0)
    assert PRESETS == ("iidm", "fast", "fastest", "pure-noise")


def test_pure_noise_preset(sched):
    rounds = pure_noise_rounds()
    assert rounds[0].start == "noise" and rounds[0].stage.start_level == 999
    assert rounds[0].stage.timesteps == tuple(range(999, 0, -2))
    assert rounds[1:] == iidm_rounds()[1:]
    assert preset_rounds("pure-noise", sched) == rounds
    assert preset_rounds("iidm", sched) == iidm_rounds()


def test_preset_and_round_errors(sched):
    with pytest.raises(ValueError, match="fixed recipe"):
        preset_rounds("iidm", sched, steps=5)
    with pytest.raises(ValueError, match="fixed recipe"):
        preset_rounds("pure-noise", sched, steps=(5, 5, 5))
    with pytest.raises(ValueError, match="unknown pipeline preset 'slow'"):
        preset_rounds("slow", sched)
    stage = Stage(10, (10, 0))
    with pytest.raises(ValueError, match="needs start='previous'"):
        Round(stage, start="reference", color_transfer=True)
    with pytest.raises(ValueError, match="unknown sampler"):
        Round(stage, sampler="euler")
    with pytest.raises(ValueError, match="eta is a DDIM option"):
        Round(stage, sampler="dpm_solver_pp_2m", eta=0.5)
    with pytest.raises(ValueError, match="first round has no previous output"):
        check_rounds([Round(stage, start="previous")])
    assert Round(stage, guidance_scale=1).unet_passes == 2 and Round(stage, guidance_scale=2).unet_passes == 4


def test_image_seed():
    seeds = {image_seed(0, f"{i:05d}") for i in range(50)} | {image_seed(1, "00000")}
    assert len(seeds) == 51 and all(0 <= s < 2 ** 63 for s in seeds)
    assert image_seed(7, "a") == image_seed(7, "a")


# ---------------------------------------------------------------- the chain, closed form
A_EPS, C_MASK = 0.3, 0.2


def dummy_unet(x_t, t, mask):
    """eps = A x + C (mask channels 0..2) + t / 4000: closed form; the mask matters, so guidance does."""
    return A_EPS * x_t + C_MASK * mask[:, :3] + t.float32().reshape(-1, 1, 1, 1) / 4000.0


class IdentityAutoencoder:
    """An autoencoder whose latent is the image itself in [-1, 1]: the Generator's own encode and
    decode then do only their pixel conversions."""

    config = SimpleNamespace(factor=1)

    def encode(self, x):
        return x

    def decode(self, latent):
        return latent


STAND_IN = Generator.from_networks(dummy_unet, IdentityAutoencoder(), make_schedule(ScheduleConfig()))
encode, decode = STAND_IN.encode, STAND_IN.decode


class RecordingTransfer:
    """A fake colour transfer (a fixed blend) that records its arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, source, reference):
        self.calls.append((source.copy(), reference.copy()))
        return ((source.astype(np.uint16) + reference) // 2).astype(np.uint8)


def inputs(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, 256, (batch, H, W, 3)).astype(np.uint8)
    labels = rng.integers(0, 3, (batch, H, W))
    masks = (labels[:, None] == np.arange(K).reshape(1, K, 1, 1)).astype(np.float32)
    return references, masks


ROUNDS = (Round(Stage(300, (250, 100)), "ddim", 2.0, start="reference"),
          Round(Stage(200, (200, 50)), "ddim", 1.5, color_transfer=True),
          Round(Stage(120, (80,)), "ddim", 3.0, color_transfer=True))


def numpy_chain(rounds, references, masks, seeds):
    """The same chain in float64 numpy: per-image PCG64 noise, q_sample, DDIM eta 0, guidance."""
    gens = [np.random.default_rng(s) for s in seeds]
    blend = lambda s, r: ((s.astype(np.uint16) + r) // 2).astype(np.uint8)  # noqa: E731
    mask3 = masks[:, :3].astype(np.float64)
    image, outputs = references, []
    for rnd in rounds:
        source = references if rnd.start == "reference" else image
        if rnd.color_transfer:
            source = np.stack([blend(s, r) for s, r in zip(image, references)])
        x0 = source.astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1.0
        noise = np.stack([g.standard_normal(x0.shape[1:], dtype=np.float32) for g in gens]).astype(np.float64)
        a = ABAR[rnd.stage.start_level]
        x = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
        ts = rnd.stage.timesteps
        for i, t in enumerate(ts):
            eps_null = A_EPS * x + t / 4000.0
            eps_mask = eps_null + C_MASK * mask3
            eps = eps_null + rnd.guidance_scale * (eps_mask - eps_null)
            a, a_next = ABAR[t], (ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0)
            x0_pred = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            x = math.sqrt(a_next) * x0_pred + math.sqrt(1 - a_next) * eps
        image = np.clip((x + 1.0) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        outputs.append(image)
    return outputs


def test_chain_matches_numpy_and_transfers_colours_between_rounds(jt, sched):
    references, masks = inputs()
    seeds = [11, 22, 33]
    transfer = RecordingTransfer()
    seen = []
    outputs = run_rounds(ROUNDS, sched, unet=dummy_unet, encode=encode, decode=decode,
                         color_transfer=transfer, masks=masks, references=references, seeds=seeds,
                         on_round=lambda i, images: seen.append((i, images.copy())))
    expected = numpy_chain(ROUNDS, references, masks, seeds)
    assert [i for i, _ in seen] == [0, 1, 2]
    for got, want, (_, reported) in zip(outputs, expected, seen):
        assert got.dtype == np.uint8 and got.shape == references.shape
        assert np.array_equal(got, reported)
        # float32 against float64: a value on a rounding boundary may land one level apart
        assert np.abs(got.astype(int) - want).max() <= 1
        assert (got == want).mean() > 0.95
    # colour transfer: exactly twice per image (before rounds 1 and 2), on the previous round's
    # output and the image's own reference, in batch order
    assert len(transfer.calls) == 2 * B
    for r in (1, 2):
        for i in range(B):
            source, reference = transfer.calls[(r - 1) * B + i]
            assert np.array_equal(source, outputs[r - 1][i])
            assert np.array_equal(reference, references[i])
    assert not np.array_equal(outputs[0], outputs[1])


MIXED = (Round(Stage(300, (300, 150, 40)), "ddim", 2.0, start="reference", eta=0.7),
         Round(Stage(250, (250, 120, 0)), "dpm_solver_pp_2m", 1.0, color_transfer=True),
         Round(Stage(100, (90, 30)), "ddpm", 2.5, color_transfer=True))
SOLVERS = (Round(Stage(300, (300, 200, 120, 60, 0)), "dpm_solver_pp_3m", 2.0, start="reference"),
           Round(Stage(250, (250, 150, 70, 20)), "unipc", 1.5, color_transfer=True))


@pytest.mark.parametrize("rounds", [MIXED, SOLVERS], ids=["ddim-dpm2m-ddpm", "dpm3m-unipc"])
def test_an_image_comes_out_the_same_alone_or_in_a_batch(jt, sched, rounds):
    references, masks = inputs(seed=5)
    seeds = [image_seed(3, name) for name in ("a", "b", "c")]

    def run(index):
        return run_rounds(rounds, sched, unet=dummy_unet, encode=encode, decode=decode,
                          color_transfer=RecordingTransfer(), masks=masks[index],
                          references=references[index], seeds=[seeds[i] for i in index])[-1]

    together = run([0, 1, 2])
    alone = run([1])
    assert np.array_equal(together[1], alone[0])
    assert not np.array_equal(together[0], together[1])
    # the noise draws matter (the start of each round; eta > 0 and DDPM): another seed gives
    # another image
    other = run_rounds(rounds, sched, unet=dummy_unet, encode=encode, decode=decode,
                       color_transfer=RecordingTransfer(), masks=masks[[1]], references=references[[1]],
                       seeds=[seeds[1] + 1])[-1]
    assert not np.array_equal(other[0], alone[0])


def test_pure_noise_round_ignores_the_reference(jt, sched):
    references, masks = inputs(seed=2)
    rounds = (Round(Stage(999, (999, 500, 0)), "ddim", 2.0, start="noise"),)
    a = run_rounds(rounds, sched, unet=dummy_unet, encode=encode, decode=decode,
                   color_transfer=RecordingTransfer(), masks=masks, references=references, seeds=[1, 2, 3])
    b = run_rounds(rounds, sched, unet=dummy_unet, encode=encode, decode=decode,
                   color_transfer=RecordingTransfer(), masks=masks, references=255 - references,
                   seeds=[1, 2, 3])
    assert np.array_equal(a[0], b[0])


def test_bad_batches(jt, sched):
    references, masks = inputs()
    with pytest.raises(ValueError, match="needs 3 references and masks"):
        run_rounds(ROUNDS, sched, unet=dummy_unet, encode=encode, decode=decode,
                   color_transfer=RecordingTransfer(), masks=masks[:2], references=references, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="masks must be at the latent's size"):
        run_rounds(ROUNDS, sched, unet=dummy_unet, encode=encode, decode=decode,
                   color_transfer=RecordingTransfer(), masks=masks[:, :, :2], references=references,
                   seeds=[1, 2, 3])
