"""Timestep respacing (guided-diffusion's exact index rules) and sampling stages.

A *stage* is one noise-and-denoise round: the input latent is noised to the level of
a training timestep (``start_level``), then a sampler visits a strictly decreasing list of
training timesteps; the step taken at ``timesteps[i]`` moves the sample to the noise level of
``timesteps[i + 1]``, and the step at the last one moves it to clean data (abar = 1). A respaced
schedule's spaced index ``k`` corresponds to ``timesteps = use[k], use[k-1], ..., use[0]``
(guided-diffusion's ``alphas_cumprod_prev`` of a spaced schedule), so every guided-diffusion /
SDM / IIDM loop over spaced indices is a stage here.

The official IIDM code counts its start in *spaced* indices and has a quirk: it noises to spaced
index ``start_t`` (``SpacedDiffusion.q_sample``) but its DDIM loop visits spaced indices
``start_t - 1 .. 0`` (``list(range(T'))[:start_t][::-1]``). ``iidm_stage`` reproduces that;
``spaced_stage`` is the natural variant that starts denoising at the level it noised to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .schedule import Schedule

SOLVER_SPACINGS = ("time_uniform", "logSNR", "trailing")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The training timesteps kept by a respacing, ascending (guided-diffusion ``space_timesteps``).

    ``"ddimN"``: the first integer stride i >= 1 with len(range(0, T, i)) == N; the kept steps are
    range(0, T, i) (e.g. ddim50 at T=1000 is 0, 20, ..., 980). Otherwise comma-separated section
    counts (or a list of ints): [0, T) is cut into len(counts) near-equal sections (the first
    T % len sections one step longer); a section of ``size`` steps taking ``n`` of them keeps
    ``start + round(k * (size - 1) / (n - 1))`` for k = 0..n-1, the fractional index accumulated
    by repeated addition and rounded half to even exactly as Python's ``round`` does there.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}; expected 'ddimN' with N an "
                                 "integer") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} of {num_timesteps} timesteps with an "
                             "integer stride (respacing 'ddimN')")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}; expected 'ddimN' or comma-separated "
                             "step counts such as '100' or '25,10'") from None
    counts = list(section_counts)
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing section counts must be positive integers, got {counts}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start_idx = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} timesteps from a section of {size}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur_idx = 0.0
        for _ in range(count):
            kept.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(kept))


def respace(schedule: Schedule, use_timesteps: Iterable[int]) -> Schedule:
    """The schedule that jumps between the kept timesteps (guided-diffusion ``SpacedDiffusion``).

    New betas make the spaced process have the same abar at every kept step:
    beta'_k = 1 - abar[use_k] / abar[use_{k-1}] (abar[use_{-1}] := 1); ``timestep_map`` maps
    spaced index k to ``use_k``. ``schedule`` must be a training (not respaced) schedule.
    """
    if schedule.is_respaced:
        raise ValueError("respace() needs the training schedule, not an already respaced one")
    use = sorted(set(int(t) for t in use_timesteps))
    if not use or use[0] < 0 or use[-1] >= schedule.num_timesteps:
        raise ValueError(f"timesteps to keep must lie in [0, {schedule.num_timesteps}), got {use[:3]}..")
    last_alpha_cumprod = 1.0
    new_betas = []
    for t in use:
        alpha_cumprod = schedule.alphas_cumprod[t]
        new_betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
        last_alpha_cumprod = alpha_cumprod
    return Schedule(np.array(new_betas), timestep_map=use)


def check_timesteps(schedule: Schedule, timesteps: Sequence[int]) -> list[int]:
    """``timesteps`` as a list of ints, checked to be strictly decreasing training timesteps."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("a sampler needs at least one timestep to visit")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {ts[:5]}...")
    if ts[-1] < 0 or ts[0] >= schedule.num_timesteps:
        raise ValueError(f"timesteps must be training timesteps in [0, {schedule.num_timesteps}), "
                         f"got {ts[0]}..{ts[-1]}")
    return ts


@dataclass(frozen=True)
class Stage:
    """One image-to-image round: noise to training timestep ``start_level``, then visit
    ``timesteps`` (strictly decreasing training timesteps) with a sampler."""

    start_level: int
    timesteps: tuple[int, ...]

    def __post_init__(self):
        ts = tuple(int(t) for t in self.timesteps)
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0:
            raise ValueError(f"Stage timesteps must be non-empty, non-negative and strictly "
                             f"decreasing, got {ts[:5]}")
        if ts[0] > self.start_level:
            raise ValueError(f"Stage starts at level {self.start_level} but first visits the "
                             f"noisier timestep {ts[0]}")
        object.__setattr__(self, "timesteps", ts)
        object.__setattr__(self, "start_level", int(self.start_level))

    @property
    def num_steps(self) -> int:
        """Network evaluations (before guidance doubling) the stage costs."""
        return len(self.timesteps)


def _spaced(num_timesteps: int, respacing: str, start_index: int) -> list[int]:
    use = space_timesteps(num_timesteps, respacing)
    if not 0 < start_index < len(use):
        raise ValueError(f"start index {start_index} is outside 1..{len(use) - 1} for respacing "
                         f"{respacing!r} ({len(use)} steps)")
    return use


def iidm_stage(respacing: str, start_index: int, num_timesteps: int = 1000) -> Stage:
    """The official IIDM round: noise to spaced index ``start_index``, denoise from ``start_index-1``.

    E.g. ("ddim500", 300) noises to timestep 600 and visits 598, 596, ..., 0 (300 steps).
    """
    use = _spaced(num_timesteps, respacing, start_index)
    return Stage(start_level=use[start_index], timesteps=tuple(use[:start_index][::-1]))


def spaced_stage(respacing: str, start_index: int, num_timesteps: int = 1000) -> Stage:
    """The natural variant: noise to spaced index ``start_index`` and denoise from that same level."""
    use = _spaced(num_timesteps, respacing, start_index)
    return Stage(start_level=use[start_index], timesteps=tuple(use[:start_index + 1][::-1]))


def solver_timesteps(schedule: Schedule, start_level: int, num_steps: int, spacing: str = "logSNR",
                     end_level: int = 0) -> tuple[int, ...]:
    """``num_steps`` strictly decreasing training timesteps from ``start_level`` for a few-step solver.

    The sampler's last step goes from the last of them to clean data (the x0 prediction there), so
    a grid that stops short of t = 0 still ends at clean data. ``end_level`` is where the grid
    stops (the last visited timestep; "trailing" stops one step above it): the x0 prediction at a
    small ``end_level`` > 0 is already close to the ODE's end point, and the steps the solver saves
    on the short range below it go to finer steps above.

    ``"logSNR"`` (the default): uniform in lambda = 0.5 log(abar / (1 - abar)) between
    lambda(start_level) and lambda(end_level), each point mapped to the nearest timestep by linear
    interpolation of lambda over the integer timesteps; an error if rounding merges two points
    (lambda changes fastest near t = 0, where timesteps are coarse). Equal steps in lambda suit
    the exponential integrators (DPM-Solver++, UniPC), whose error depends on the steps and step
    ratios in lambda.
    ``"time_uniform"``: round(linspace(start_level, end_level, num_steps)). Down to t = 0 its last
    step is short in t but long in lambda (lambda rises fastest near t = 0), so a multistep solver
    extrapolates its last step far: accurate only with many steps.
    ``"trailing"``: round(linspace(start_level, end_level, num_steps + 1)) without its final point:
    uniform in t and stopping (to t = 0) at start_level / num_steps, whose x0 prediction is the
    result (diffusers' "trailing" spacing, counted from the start level).
    """
    if schedule.is_respaced:
        raise ValueError("solver_timesteps() needs the training schedule, not a respaced one")
    if not 0 <= start_level < schedule.num_timesteps:
        raise ValueError(f"start_level must be in [0, {schedule.num_timesteps}), got {start_level}")
    if spacing not in SOLVER_SPACINGS:
        raise ValueError(f"unknown solver spacing {spacing!r}; expected one of {SOLVER_SPACINGS}")
    if not 0 <= end_level <= start_level:
        raise ValueError(f"end_level must be in [0, start_level = {start_level}], got {end_level}")
    span = start_level - end_level
    most = span if spacing == "trailing" else span + 1
    if not 1 <= num_steps <= most:
        raise ValueError(f"num_steps must be in 1..{most} for start level {start_level}, end level "
                         f"{end_level} and spacing {spacing!r}, got {num_steps}")
    if num_steps == 1:
        return (int(start_level),)
    if spacing == "time_uniform":
        points = np.linspace(start_level, end_level, num_steps)
    elif spacing == "trailing":
        points = np.linspace(start_level, end_level, num_steps + 1)[:-1]
    else:
        lam = 0.5 * (np.log(schedule.alphas_cumprod) - np.log1p(-schedule.alphas_cumprod))
        targets = np.linspace(lam[start_level], lam[end_level], num_steps)
        # lambda decreases with t; np.interp needs increasing abscissae.
        points = np.interp(targets, lam[::-1], np.arange(schedule.num_timesteps)[::-1].astype(float))
    ts = [int(v) for v in np.round(points)]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{num_steps} {spacing} steps from level {start_level} to {end_level} round "
                         f"to repeated timesteps ({ts}); use fewer steps or 'time_uniform'")
    return tuple(ts)


def solver_stage(schedule: Schedule, start_level: int, num_steps: int, spacing: str = "logSNR",
                 end_level: int = 0) -> Stage:
    """A stage for a few-step solver: noise to ``start_level`` and visit ``num_steps`` timesteps
    from ``start_level`` down to ``end_level`` (``solver_timesteps``)."""
    return Stage(start_level=start_level,
                 timesteps=solver_timesteps(schedule, start_level, num_steps, spacing, end_level))
