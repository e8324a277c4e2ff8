"""IIDM inference as data: a list of rounds, each one noise-and-denoise pass over a batch.

A ``Round`` says where its clean latent comes from (the encoded style reference, the previous
round's output image, or nothing: pure noise), whether that previous output is first
colour-transferred toward the reference, the stage (noise level it starts from and timesteps it
visits, ``ldm.respace``), the sampler and the guidance scale. ``run_rounds`` chains the rounds of
one batch in memory:

    image_0 = reference                            (or pure noise for a "noise" round)
    round r:  source = color_transfer(image_{r-1}, reference)  if the round asks for it
              x_0    = encode(source)
              x      = q_sample(x_0, stage.start_level, noise)  then the sampler over stage.timesteps
                       with eps = eps_null + s (eps_mask - eps_null)   (classifier-free guidance)
              image_r = decode(x)                  uint8, as the official code's files between rounds

The official IIDM code writes JPEG (quality 75) between rounds; here the uint8 images stay in
memory. Networks arrive as callables, so this module imports no network class.
Every image draws its noise from its own seeded generator (``PerImageNoise``), continued across
rounds, so its output does not depend on the batch it is generated in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

import jittor_env  # noqa: F401  (must precede any import of jittor)
import jittor as jt

from .guidance import MaskedNet, classifier_free_guidance
from .respace import Stage, iidm_stage, solver_stage
from .samplers import ODE_SOLVERS, SAMPLERS, PerImageNoise, img2img_start
from .schedule import Schedule

STARTS = ("reference", "previous", "noise")
# encode(images uint8 [B, H, W, 3]) -> latent [B, C, h, w]; decode(latent) -> uint8 [B, H, W, 3]
Encode = Callable[[np.ndarray], jt.Var]
Decode = Callable[[jt.Var], np.ndarray]
# color_transfer(source RGB uint8 [H, W, 3], reference RGB uint8 [H, W, 3]) -> RGB uint8 [H, W, 3]
ColorTransfer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Round:
    """One round of the pipeline.

    start           "reference": noise the encoded style reference; "previous": noise the
                    encoded output of the round before; "noise": start from N(0, I) at the level
                    of ``stage.timesteps[0]`` (``stage.start_level`` is then only a label).
    color_transfer  colour-transfer the previous output toward the reference before encoding it
                    (only with start "previous").
    stage           the noise level the round starts from and the timesteps it visits.
    sampler         "ddim", "ddpm", "dpm_solver_pp_2m", "dpm_solver_pp_3m" or "unipc" (UniPC-2)
                    (``ldm.samplers.SAMPLERS``).
    guidance_scale  s of classifier-free guidance; 1 runs the masked pass only.
    eta             DDIM's eta (0: deterministic); DDIM only.
    """

    stage: Stage
    sampler: str = "ddim"
    guidance_scale: float = 1.0
    start: str = "previous"
    color_transfer: bool = False
    eta: float = 0.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Round: unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.start not in STARTS:
            raise ValueError(f"Round: start must be one of {STARTS}, got {self.start!r}")
        if self.color_transfer and self.start != "previous":
            raise ValueError("Round: colour transfer applies to the previous round's output, so it "
                             f"needs start='previous', got start={self.start!r}")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"Round: eta is a DDIM option, but the sampler is {self.sampler!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"Round: eta must be in [0, 1], got {self.eta}")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))

    @property
    def unet_passes(self) -> int:
        """U-Net evaluations per image: one per visited timestep, two with guidance (s != 1)."""
        return self.stage.num_steps * (1 if self.guidance_scale == 1.0 else 2)


def check_rounds(rounds: Sequence[Round]) -> tuple[Round, ...]:
    """``rounds`` as a tuple, checked: at least one, and the first does not need a previous output."""
    rounds = tuple(rounds)
    if not rounds:
        raise ValueError("a pipeline needs at least one round")
    if not all(isinstance(r, Round) for r in rounds):
        raise TypeError("rounds must be ldm.pipeline.Round objects")
    if rounds[0].start == "previous":
        raise ValueError("the first round has no previous output: start it from 'reference' or 'noise'")
    return rounds


def unet_passes(rounds: Sequence[Round]) -> int:
    """U-Net evaluations per image for the whole pipeline (masked and null passes counted apart)."""
    return sum(r.unet_passes for r in rounds)


# --------------------------------------------------------------------------------------- presets
# IIDM's rounds: the noise level each starts from (a timestep at T = 1000) and its guidance scale.
IIDM_LEVELS_SCALES = ((600, 3.5), (640, 3.7), (400, 3.7))


def iidm_rounds(num_timesteps: int = 1000) -> tuple[Round, ...]:
    """The official IIDM recipe: DDIM eta 0, three rounds.

    round 0: the encoded reference noised to spaced index 300 of "ddim500" (t = 600), s = 3.5
    round 1: round 0 colour-transferred, spaced index 320 of "ddim500" (t = 640), s = 3.7
    round 2: round 1 colour-transferred, spaced index 20 of "ddim50" (t = 400), s = 3.7
    (each denoises from spaced index start - 1, the official loop's quirk: ``iidm_stage``);
    (300 + 320 + 20) x 2 = 1280 U-Net passes per image.
    """
    return (
        Round(iidm_stage("ddim500", 300, num_timesteps), "ddim", 3.5, start="reference"),
        Round(iidm_stage("ddim500", 320, num_timesteps), "ddim", 3.7, color_transfer=True),
        Round(iidm_stage("ddim50", 20, num_timesteps), "ddim", 3.7, color_transfer=True),
    )


@dataclass(frozen=True)
class SolverPreset:
    """A few-step version of IIDM's rounds: a sampler and a step count per round, one grid.

    ``spacing`` and ``end_level`` are ``ldm.respace.solver_timesteps``'s; ``end_level`` is given
    for T = 1000 and scaled like the rounds' start levels."""

    samplers: tuple[str, ...]
    steps: tuple[int, ...]
    spacing: str = "logSNR"
    end_level: int = 0


# Chosen by measurement against the analytic oracle (bench/oracle.py, tests/test_oracle.py;
# docs/benchmarks.md, "Sampler accuracy"): each round measured against the exact ODE solution and
# the official round's error on the same points, on a Gaussian and a two-mode mixture. The grid:
# logSNR steps that stop at t = 4 (lambda 3.6, sigma/alpha 0.026) and take the x0 prediction
# there. Going on to t = 0 (lambda 4.6) makes every step 17-22% longer in lambda for a last stretch
# where the data prediction hardly changes; stopping much earlier makes the final jump's own error
# (the posterior mean against the ODE's end point) too large. Time-uniform, trailing, EDM (rho)
# and time-quadratic grids were all worse at these step counts. The solvers: rounds 0 and 1 start
# from high noise (lambda -1.8 and -2.1) and their official error is small (about 0.008-0.009:
# DDIM over 300 and 320 steps): DPM-Solver++(3M) over 12 steps each. Round 2 starts lower
# (t = 400) and its official round is coarse (error about 0.07): UniPC-2 over 6 steps. Every
# round of ``fast`` is then within the official round's error on both data sets. A singlestep
# second-order first step, UniPC's B(h) = h, noise prediction and a corrector on the last step
# (one more evaluation) were worse at equal passes; UniPC-3 was worse in rounds 0 and 1 and better
# in round 2 here, but not at a grid to t = 0 (at these step counts the ranking of the solvers
# changes with the grid), so round 2 keeps UniPC-2. ``fastest`` (30 passes): UniPC-2 over 5
# steps per round on the same grid.
SOLVER_PRESETS = {
    "fast": SolverPreset(("dpm_solver_pp_3m", "dpm_solver_pp_3m", "unipc"), (12, 12, 6), end_level=4),
    "fastest": SolverPreset(("unipc", "unipc", "unipc"), (5, 5, 5), end_level=4),
}


def solver_rounds(schedule: Schedule, preset: SolverPreset,
                  steps: int | Sequence[int] | None = None) -> tuple[Round, ...]:
    """IIDM's three rounds (same noise levels 600, 640, 400, scales and colour transfers) with the
    preset's solver, steps per round and grid; ``steps`` overrides the steps: one int for every
    round or one per round. Each round denoises from the level it noised to (no start - 1 quirk)."""
    counts = _steps_per_round(preset.steps if steps is None else steps, len(IIDM_LEVELS_SCALES))
    end = _level(preset.end_level, schedule)
    return tuple(
        Round(solver_stage(schedule, _level(level, schedule), n, preset.spacing, end), sampler, scale,
              start="reference" if i == 0 else "previous", color_transfer=i > 0)
        for i, ((level, scale), sampler, n) in enumerate(zip(IIDM_LEVELS_SCALES, preset.samplers,
                                                              counts)))


def fast_rounds(schedule: Schedule, steps: int | Sequence[int] | None = None) -> tuple[Round, ...]:
    """The ``fast`` preset: DPM-Solver++(3M), DPM-Solver++(3M) and UniPC-2 over 12, 12 and 6
    logSNR-spaced steps down to t = 4, (12 + 12 + 6) x 2 = 60 U-Net passes per image against 1280
    for ``iidm``. On the oracle every round's error is below the official round's: at most 0.78
    of it (round 1 on the two-mode mixture)."""
    return solver_rounds(schedule, SOLVER_PRESETS["fast"], steps)


def fastest_rounds(schedule: Schedule, steps: int | Sequence[int] | None = None) -> tuple[Round, ...]:
    """The ``fastest`` preset: UniPC-2 over 5 logSNR-spaced steps per round down to t = 4,
    (5 + 5 + 5) x 2 = 30 U-Net passes per image. Oracle error (largest over the points) about
    0.05 / 0.04 / 0.04 per round on the Gaussian data (0.05-0.06 with other draws of the points, 0.07
    over 16384 points) and 0.08 / 0.09 / 0.06 on the mixture, against 0.009 / 0.008 / 0.07 for the
    official rounds: 5 to 11 times the official error in the first two rounds."""
    return solver_rounds(schedule, SOLVER_PRESETS["fastest"], steps)


def pure_noise_rounds(num_timesteps: int = 1000) -> tuple[Round, ...]:
    """The ablation without the style reference as the starting point: round 0 starts from pure
    noise at T - 1 and runs DDIM (eta 0, s = 3.5) over every second timestep T-1, T-3, ..., 1
    (500 steps, the ddim500 stride); rounds 1 and 2 are IIDM's refinement rounds unchanged."""
    first = Stage(start_level=num_timesteps - 1, timesteps=tuple(range(num_timesteps - 1, -1, -2)))
    return (Round(first, "ddim", 3.5, start="noise"),) + iidm_rounds(num_timesteps)[1:]


def _level(level_at_1000: int, schedule: Schedule) -> int:
    """A noise level given for T = 1000, at the same fraction of another schedule's T."""
    return round(level_at_1000 * schedule.num_timesteps / 1000)


def _steps_per_round(steps, num_rounds: int) -> tuple[int, ...]:
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        counts = (int(steps),) * num_rounds
    else:
        try:
            counts = tuple(steps)
        except TypeError:
            raise TypeError(f"steps must be an int or a sequence of ints, got {steps!r}") from None
        if len(counts) != num_rounds:
            raise ValueError(f"steps per round: expected {num_rounds} values (one per round), got "
                             f"{len(counts)}: {list(counts)}")
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise ValueError(f"steps per round must be positive integers, got {list(counts)}")
    return tuple(int(n) for n in counts)


PRESETS = ("iidm", "fast", "fastest", "pure-noise")


def preset_rounds(name: str, schedule: Schedule,
                  steps: int | Sequence[int] | None = None) -> tuple[Round, ...]:
    """The rounds of a named preset for ``schedule``.

    ``steps`` (solver steps per round: one int for every round, or one per round) applies to the
    solver presets ``fast`` and ``fastest`` only (None: the preset's own); ``iidm`` and
    ``pure-noise`` are fixed recipes.
    """
    if name in SOLVER_PRESETS:
        return solver_rounds(schedule, SOLVER_PRESETS[name], steps)
    if steps is not None:
        raise ValueError(f"the {name!r} preset is a fixed recipe; steps per round can be chosen for "
                         f"the solver presets only ({', '.join(SOLVER_PRESETS)})")
    if name == "iidm":
        return iidm_rounds(schedule.num_timesteps)
    if name == "pure-noise":
        return pure_noise_rounds(schedule.num_timesteps)
    raise ValueError(f"unknown pipeline preset {name!r}; choose one of {', '.join(PRESETS)}")


# ------------------------------------------------------------------------------------------ seeds
def image_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one image from the run's seed and the image's name (SHA-256 of both), so
    an image gets the same noise whatever the batch, the order or the process it lands in."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ------------------------------------------------------------------------------------------- run
def run_rounds(rounds: Sequence[Round], schedule: Schedule, *, unet: MaskedNet, encode: Encode,
               decode: Decode, color_transfer: ColorTransfer, masks: np.ndarray,
               references: np.ndarray, seeds: Sequence[int],
               on_round: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray]:
    """Run ``rounds`` on one batch; returns each round's images, uint8 [B, H, W, 3].

    masks       float32 one-hot [B, num_classes, h, w] at the latent's size (h, w = H/f, W/f)
    references  style references, RGB uint8 [B, H, W, 3]
    seeds       one int per image (``image_seed``); its noise stream runs across all rounds
    on_round    called as on_round(index, images) after each round (progress, saving rounds)
    """
    rounds = check_rounds(rounds)
    references = np.asarray(references)
    masks = np.asarray(masks, dtype=np.float32)
    batch = len(seeds)
    if references.dtype != np.uint8 or references.ndim != 4 or references.shape[3] != 3:
        raise ValueError(f"references must be RGB uint8 [B, H, W, 3], got {references.dtype} "
                         f"{references.shape}")
    if references.shape[0] != batch or masks.ndim != 4 or masks.shape[0] != batch:
        raise ValueError(f"a batch of {batch} seeds needs {batch} references and masks, got "
                         f"references {references.shape} and masks {masks.shape}")
    noise = PerImageNoise(seeds)
    mask = jt.array(masks)
    previous: np.ndarray | None = None
    outputs = []
    for index, rnd in enumerate(rounds):
        model_fn = classifier_free_guidance(unet, mask, rnd.guidance_scale)
        sampler = SAMPLERS[rnd.sampler]
        options = {} if rnd.sampler in ODE_SOLVERS else {"noise_fn": noise}
        if rnd.sampler == "ddim":
            options["eta"] = rnd.eta
        if rnd.start == "previous":
            source = previous
            if rnd.color_transfer:
                source = np.stack([color_transfer(image, reference)
                                   for image, reference in zip(previous, references)])
        else:
            source = references
        x0 = encode(source)  # for a "noise" round only its shape is used
        _check_latent(x0, masks, index)
        if rnd.start == "noise":
            x = noise(x0.shape)
        else:
            x = img2img_start(schedule, x0, rnd.stage.start_level, noise(x0.shape))
        latent = sampler(model_fn, schedule, x, rnd.stage.timesteps, **options)
        previous = np.asarray(decode(latent))
        if previous.shape != references.shape or previous.dtype != np.uint8:
            raise ValueError(f"round {index}: decode returned {previous.dtype} {previous.shape}, "
                             f"expected uint8 {references.shape} like the references")
        outputs.append(previous)
        if on_round is not None:
            on_round(index, previous)
    return outputs


def _check_latent(x0: jt.Var, masks: np.ndarray, index: int) -> None:
    if len(x0.shape) != 4 or tuple(x0.shape[2:]) != masks.shape[2:]:
        raise ValueError(f"round {index}: the latent {tuple(x0.shape)} and the masks {masks.shape} "
                         "differ in height or width; masks must be at the latent's size")
