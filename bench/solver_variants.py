"""The solver variants and grids the ``fast`` preset was chosen against, measured on the analytic
oracle (bench/oracle.py) in float64 numpy: the variants that ldm.samplers does not carry, beside
the ones it does (which agree with it to rounding, tests/test_solver_variants.py).

    python -m bench.solver_variants

Every variant is a multistep exponential integrator of the probability-flow ODE over the visited
training timesteps (notation of ``ldm.samplers.dpm_solver_pp_3m``: alpha, sigma, lambda =
log(alpha / sigma); from t_i to t_{i+1}, h = lambda_{i+1} - lambda_i, tau = lambda - lambda_i):

    data prediction:   x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} int_0^h e^{tau - h} P(tau) dtau
    noise prediction:  x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} int_0^h e^{h - tau} P(tau) dtau

(Lu et al. 2022: DPM-Solver++ for the first, DPM-Solver for the second), where P interpolates, in
lambda, the model's data (or noise) predictions at the last k evaluations. The integral of each
Lagrange basis polynomial is taken by 40-point Gauss-Legendre quadrature (exact to rounding for
these smooth integrands). On data predictions, k = 1, 2, 3 are DDIM, DPM-Solver++(2M) and 3M,
except that with two nodes the difference term takes UniPC's weight 1/2 times B(h) (Zhao et al.
2023; B(h) = e^{-h} - 1, "bh2", which is DPM-Solver++(2M)'s own choice, or -h, "bh1") instead of
its exact integral. UniPC-p predicts with p nodes and corrects with p + 1: after the evaluation at
the predicted x_{i+1}, the step from x_i is redone with that evaluation as a node too; the
evaluation stays in the history, so the corrector costs no network call except after the last
visited timestep. Variants:

* ``first_2s``: the first interval by DPM-Solver++(2S) (Lu et al. 2022, Alg. 1: a singlestep
  second-order step through the timestep nearest lambda_0 + h/2, one more evaluation), and
  ``keep_midpoint``: that evaluation also joins the multistep history.
* ``last_corrector``: the corrector also after the last visited timestep, and one more evaluation
  at the corrected point gives the result.

The result is always the data prediction at the last visited timestep (the step to clean data),
as in ldm.samplers. Grids beyond ``ldm.respace.solver_timesteps``: Karras et al. 2022's (EDM)
sigma_i = (sigma_max^{1/rho} + i/(N-1) (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho with
sigma = sqrt((1 - abar) / abar), and a power law in time, t_i = (t_0^{1/k} + i/(N-1)
(t_end^{1/k} - t_0^{1/k}))^k (k = 2: DPM-Solver's "time_quadratic"), each point mapped to the
nearest training timestep.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache
from typing import Sequence

import numpy as np

from bench.oracle import DATA, SHAPE, GaussianMixture, points_and_solution

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(40)
LEVELS = (600, 640, 400)  # the IIDM rounds' noise levels


def _lambda(abar) -> np.ndarray:
    return 0.5 * (np.log(abar) - np.log1p(-np.asarray(abar)))


def _integral_weights(nodes: Sequence[float], h: float, prediction: str) -> list[float]:
    """int_0^h kernel(tau) L_j(tau) dtau for the Lagrange basis L_j on ``nodes`` (tau values);
    kernel e^{tau - h} for data prediction, e^{h - tau} for noise prediction."""
    tau = 0.5 * h * (_NODES + 1.0)
    kernel = np.exp(tau - h) if prediction == "data" else np.exp(h - tau)
    out = []
    for j, node in enumerate(nodes):
        basis = np.prod([(tau - other) / (node - other) for k, other in enumerate(nodes) if k != j], axis=0)
        out.append(0.5 * h * float(np.sum(_WEIGHTS * kernel * basis)))
    return out


def _weights(nodes: Sequence[float], h: float, prediction: str, bh: str) -> list[float]:
    """Weights of the node values (nodes[0] = 0 is the current point): with two nodes UniPC's
    simplified rule, base term exact and difference term B(h)/2 times (value_1 - value_0) / r,
    r = nodes[1] / h (``bh`` "bh2" or "bh1"); otherwise (or with ``bh`` "exact") the exact
    integrals."""
    if len(nodes) != 2 or bh == "exact":
        return _integral_weights(nodes, h, prediction)
    r = nodes[1] / h
    if prediction == "data":
        base, b_h = -math.expm1(-h), (math.expm1(-h) if bh == "bh2" else -h)
        return [base + 0.5 * b_h / r, -0.5 * b_h / r]
    base, b_h = math.expm1(h), (math.expm1(h) if bh == "bh2" else h)
    return [base - 0.5 * b_h / r, 0.5 * b_h / r]


def integrate(data: GaussianMixture, abar: np.ndarray, x: np.ndarray, timesteps: Sequence[int], *,
              order: int, corrector: bool = False, bh: str = "bh2", prediction: str = "data",
              first_2s: bool = False, keep_midpoint: bool = False, last_corrector: bool = False,
              exact_steps: int = 0) -> np.ndarray:
    """The multistep integrator of the module docstring over ``timesteps`` (strictly decreasing
    training timesteps, ``x`` at the first), with the exact eps of ``data`` as the model; returns
    the data prediction at the last visited timestep (after ``last_corrector``'s extra evaluation).
    ``order``: the predictor's nodes (fewer while the history is shorter). ``exact_steps``: a
    diagnostic, the first steps follow the exact ODE flow (their evaluations still fill the
    history), to see which steps' errors matter."""
    if (first_2s or exact_steps) and (corrector or prediction != "data"):
        raise ValueError("the 2S first step and exact steps are measured with the data-prediction "
                         "predictor alone")
    ts = [int(t) for t in timesteps]
    lam_all = _lambda(abar)

    def evaluate(x, t):
        eps = data.eps(x, abar[t])
        x0 = (x - math.sqrt(1.0 - abar[t]) * eps) / math.sqrt(abar[t])
        return x0, (x0 if prediction == "data" else eps)

    def step(x, t, t_next, nodes):
        """From x at t to t_next; ``nodes`` [(lambda, value)], the first at t."""
        h = lam_all[t_next] - lam_all[t]
        w = _weights([node - lam_all[t] for node, _ in nodes], h, prediction, bh)
        combination = sum(wj * value for wj, (_, value) in zip(w, nodes))
        if prediction == "data":
            return math.sqrt((1.0 - abar[t_next]) / (1.0 - abar[t])) * x + math.sqrt(abar[t_next]) * combination
        return math.sqrt(abar[t_next] / abar[t]) * x - math.sqrt(1.0 - abar[t_next]) * combination

    history: list[tuple[float, np.ndarray]] = []  # (lambda, value) of the evaluations, oldest first
    predictor_nodes: list[tuple[float, np.ndarray]] = []
    x_from = None
    for i, t in enumerate(ts):
        x0, value = evaluate(x, t)
        if i > 0 and corrector:
            # redo the step from x_from with this evaluation as the second node
            x = step(x_from, ts[i - 1], t, predictor_nodes[:1] + [(lam_all[t], value)] + predictor_nodes[1:])
        if i + 1 == len(ts):
            if last_corrector and corrector:
                x0, _ = evaluate(x, t)
            return x0
        history.append((float(lam_all[t]), value))
        x_from = x
        if i < exact_steps:
            x = data.flow(x, abar[t], abar[ts[i + 1]])
            continue
        if i == 0 and first_2s:
            x, midpoint = _two_stage(data, abar, x, t, ts[1], x0)
            if keep_midpoint:
                history.append(midpoint)
            continue
        predictor_nodes = history[::-1][:order]
        x = step(x, t, ts[i + 1], predictor_nodes)
    raise ValueError("timesteps must not be empty")


def _two_stage(data, abar, x, t, t_next, x0):
    """DPM-Solver++(2S) from t to t_next through the timestep nearest the lambda midpoint; returns
    x at t_next and (lambda, data prediction) at the midpoint."""
    lam_all = _lambda(abar)
    target = 0.5 * (lam_all[t] + lam_all[t_next])
    mid = int(round(float(np.interp(target, lam_all[::-1], np.arange(len(abar))[::-1].astype(float)))))
    s = math.sqrt(1.0 - abar[t])
    a_m, s_m = math.sqrt(abar[mid]), math.sqrt(1.0 - abar[mid])
    a_1, s_1 = math.sqrt(abar[t_next]), math.sqrt(1.0 - abar[t_next])
    h = lam_all[t_next] - lam_all[t]
    r = (lam_all[mid] - lam_all[t]) / h
    u = (s_m / s) * x - a_m * math.expm1(-r * h) * x0
    x0_mid = data.x0_prediction(u, abar[mid])
    d = (1.0 - 0.5 / r) * x0 + (0.5 / r) * x0_mid
    return (s_1 / s) * x - a_1 * math.expm1(-h) * d, (float(lam_all[mid]), x0_mid)


# ------------------------------------------------------------------------------------- grids
def grid(abar: np.ndarray, kind: str, level: int, num_steps: int, end_level: int = 0,
         param: float | None = None) -> tuple[int, ...]:
    """``num_steps`` timesteps from ``level`` to ``end_level``: "logSNR", "time_uniform" and
    "trailing" as ``ldm.respace.solver_timesteps``; "edm" (``param`` rho) and "time_power"
    (``param`` k) as the module docstring, mapped to the nearest timestep in lambda (edm) or t."""
    if kind in ("logSNR", "time_uniform", "trailing"):
        from ldm.respace import solver_timesteps
        from ldm.schedule import Schedule

        return solver_timesteps(Schedule(1.0 - abar / np.append(1.0, abar[:-1])), level, num_steps,
                                kind, end_level)
    i = np.linspace(0.0, 1.0, num_steps)
    if kind == "edm":
        sig = np.sqrt((1.0 - abar) / abar)
        lo, hi = sig[end_level] ** (1 / param), sig[level] ** (1 / param)
        lam = -np.log((hi + i * (lo - hi)) ** param)
        lam_all = _lambda(abar)
        points = np.interp(lam, lam_all[::-1], np.arange(len(abar))[::-1].astype(float))
    elif kind == "time_power":
        points = (level ** (1 / param) + i * (end_level ** (1 / param) - level ** (1 / param))) ** param
    else:
        raise ValueError(f"unknown grid {kind!r}")
    ts = tuple(int(v) for v in np.round(points))
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"grid {kind} {param} of {num_steps} from {level} repeats timesteps: {ts}")
    return ts


# ---------------------------------------------------------------------------------- measuring
VARIANTS = {  # name: (integrate options, evaluations beyond the grid's points)
    "DPM-Solver++(2M)": ({"order": 2}, 0),
    "DPM-Solver++(3M)": ({"order": 3}, 0),
    "3M, exact second step": ({"order": 3, "bh": "exact"}, 0),
    "3M, 2S first step": ({"order": 3, "first_2s": True}, 1),
    "3M, 2S first step, midpoint kept": ({"order": 3, "first_2s": True, "keep_midpoint": True}, 1),
    "UniPC-2": ({"order": 2, "corrector": True}, 0),
    "UniPC-2, B(h) = h": ({"order": 2, "corrector": True, "bh": "bh1"}, 0),
    "UniPC-3": ({"order": 3, "corrector": True}, 0),
    "UniPC-3, B(h) = h": ({"order": 3, "corrector": True, "bh": "bh1"}, 0),
    "UniPC-2, last corrector": ({"order": 2, "corrector": True, "last_corrector": True}, 1),
    "UniPC-3, last corrector": ({"order": 3, "corrector": True, "last_corrector": True}, 1),
    "3M, noise prediction": ({"order": 3, "prediction": "noise"}, 0),
    "UniPC-2, noise prediction": ({"order": 2, "corrector": True, "prediction": "noise"}, 0),
}


def linear_abar() -> np.ndarray:
    from ldm.schedule import make_schedule

    return make_schedule().alphas_cumprod


def error(data: GaussianMixture, abar: np.ndarray, level: int, timesteps: Sequence[int], seed: int = 0,
          **options) -> float:
    """Largest |result - exact ODE solution| over the oracle's points noised to ``level``."""
    x, exact = points_and_solution(data, float(abar[level]), tuple(SHAPE), seed, "data")
    return float(np.abs(integrate(data, abar, x, timesteps, **options) - exact).max())


# Data beyond the oracle's two sets, to see whether a choice carries over: three narrower modes, and
# two wide overlapping ones.
OTHER_DATA = {"three narrow modes": GaussianMixture([0.3, 0.3, 0.4], [-0.7, 0.0, 0.7], [0.1, 0.15, 0.25]),
              "two wide modes": GaussianMixture([0.5, 0.5], [-0.3, 0.4], [0.4, 0.6])}


@lru_cache(maxsize=None)
def official_error(name: str, round_index: int, seed: int = 0) -> float:
    """The official IIDM round's error (DDIM over its timesteps, from points noised to its level)."""
    from ldm.pipeline import iidm_rounds

    stage = iidm_rounds()[round_index].stage
    data = DATA[name] if name in DATA else OTHER_DATA[name]
    return error(data, linear_abar(), stage.start_level, stage.timesteps, seed, order=1)


def ratio(abar, round_index: int, timesteps, seed: int = 0, data=DATA, **options) -> float:
    """The largest over ``data`` of error / the official round's error."""
    return max(error(d, abar, LEVELS[round_index], timesteps, seed, **options)
               / official_error(name, round_index, seed) for name, d in data.items())


FAST = (("DPM-Solver++(3M)", 12), ("DPM-Solver++(3M)", 12), ("UniPC-2", 6))


def variant_table(end_level: int, evaluations=((10, 15), (10, 15), (4, 9))) -> dict:
    """{(round, variant): [ratio at each evaluation count]} on logSNR grids to ``end_level``."""
    abar = linear_abar()
    table = {}
    for index, (low, high) in enumerate(evaluations):
        for name, (options, extra) in VARIANTS.items():
            table[index, name] = [ratio(abar, index, grid(abar, "logSNR", LEVELS[index], n - extra, end_level),
                                        **options) for n in range(low, high)]
    return table


GRIDS = [("logSNR", 0, None), ("logSNR", 4, None), ("time_uniform", 0, None), ("trailing", 0, None),
         ("time_power", 0, 2.0), ("time_power", 4, 2.0), ("edm", 0, 3.0), ("edm", 0, 7.0), ("edm", 4, 3.0),
         ("edm", 4, 7.0)]


def grid_table() -> dict:
    """{(grid, end, param): [ratio of each round]} of the fast preset's solvers and steps."""
    abar = linear_abar()
    return {spec: [ratio(abar, index, grid(abar, spec[0], LEVELS[index], n, spec[1], spec[2]), **VARIANTS[name][0])
                   for index, (name, n) in enumerate(FAST)]
            for spec in GRIDS}


def seed_table(end_levels=(0, 4), seeds=range(5)) -> dict:
    """{(end, seed): [ratio of each round]} of the fast preset on other sets of points."""
    abar = linear_abar()
    return {(end, seed): [ratio(abar, index, grid(abar, "logSNR", LEVELS[index], n, end), seed, **VARIANTS[name][0])
                          for index, (name, n) in enumerate(FAST)]
            for end in end_levels for seed in seeds}


def end_parts(end_levels=(0, 4)) -> dict:
    """{(data set, end, round): (error, solver part, jump part)} of 3M over 12 logSNR steps in
    rounds 0 and 1: the largest |result - exact solution|, the largest |result - x0 prediction of
    the exact state at the grid's end| (the solver's own error) and the largest |that x0
    prediction - exact solution| (the final jump's)."""
    abar = linear_abar()
    parts = {}
    for name, data in DATA.items():
        for end in end_levels:
            for index in (0, 1):
                level = LEVELS[index]
                x, exact = points_and_solution(data, float(abar[level]), tuple(SHAPE), 0, "data")
                got = integrate(data, abar, x, grid(abar, "logSNR", level, 12, end), order=3)
                jumped = data.x0_prediction(data.flow(x, abar[level], abar[end]), abar[end])
                parts[name, end, index] = tuple(float(np.abs(a - b).max())
                                                for a, b in ((got, exact), (got, jumped), (jumped, exact)))
    return parts


def exact_start_table(end_level: int = 4, exact_steps=range(0, 11)) -> dict:
    """{round: [ratio with the first k steps exact, for each k]} of 3M over 12 logSNR steps."""
    abar = linear_abar()
    return {index: [ratio(abar, index, grid(abar, "logSNR", LEVELS[index], 12, end_level), order=3, exact_steps=k)
                     for k in exact_steps]
            for index in (0, 1)}


def order_table(steps=(20, 40, 80), start: int = 999, end: int = 199) -> dict:
    """{variant: [error at each step count]} on the mixture over time-uniform grids from ``start``
    to ``end``, against the x0 prediction at ``end`` of the exact ODE solution (the grids of
    bench_samplers.order_errors)."""
    from bench.oracle import MIXTURE

    abar = linear_abar()
    x = MIXTURE.noised(abar[start], SHAPE, seed=1)
    reference = MIXTURE.x0_prediction(MIXTURE.flow(x, abar[start], abar[end], rk4_steps=1000), abar[end])
    return {name: [float(np.abs(integrate(MIXTURE, abar, x, [int(v) for v in np.linspace(start, end, n + 1)],
                                          **options) - reference).max()) for n in steps]
            for name, (options, _) in VARIANTS.items()}


def other_data_table(end_levels=(0, 4)) -> dict:
    """{(data set, end): [ratio of each round]} of the fast preset on ``OTHER_DATA``."""
    abar = linear_abar()
    return {(name, end): [ratio(abar, index, grid(abar, "logSNR", LEVELS[index], n, end), data={name: data},
                                **VARIANTS[solver][0]) for index, (solver, n) in enumerate(FAST)]
            for name, data in OTHER_DATA.items() for end in end_levels}


def main(argv=None) -> int:
    for end in (0, 4):
        table = variant_table(end)
        print(f"\nLargest error / official round's error, logSNR grids to t = {end}, by network evaluations")
        for index, counts in enumerate(((10, 15), (10, 15), (4, 9))):
            print(f"  round {index} (t = {LEVELS[index]})  " + "".join(f"{n:7d}" for n in range(*counts)))
            for name in VARIANTS:
                print(f"    {name:34s}" + "".join(f"{v:7.2f}" for v in table[index, name]))
    print("\n3M over 12 logSNR steps in rounds 0 and 1: error, solver part, jump part (end_parts):")
    for (name, end, index), values in end_parts().items():
        print(f"  {name:8s} to t = {end} round {index}  " + "  ".join(f"{v:.4f}" for v in values))
    print("\n3M over 12 logSNR steps to t = 4 with its first k = 0..10 steps following the exact flow:")
    for index, values in exact_start_table().items():
        print(f"  round {index}   " + "".join(f"{v:6.2f}" for v in values))
    print("\nThe fast preset's solvers and steps (3M 12, 3M 12, UniPC-2 6) on other grids:")
    for (kind, end, param), values in grid_table().items():
        label = f"{kind}{'' if param is None else f' {param:g}'} to t = {end}"
        print(f"  {label:26s}" + "".join(f"{v:7.2f}" for v in values))
    print("\nThe fast preset's solvers and steps on other sets of points (seeds):")
    for (end, seed), values in seed_table().items():
        print(f"  to t = {end}, seed {seed}   " + "".join(f"{v:7.2f}" for v in values))
    print("\nConvergence on the mixture, time-uniform grids 999 -> 199 (20, 40, 80 steps):")
    for name, errors in order_table().items():
        orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        print(f"  {name:34s}" + "  ".join(f"{e:.2e}" for e in errors) + "   orders "
              + "  ".join(f"{o:.2f}" for o in orders))
    print("\nThe fast preset's solvers and steps on other data (ratio to the official round on it):")
    for (name, end), values in other_data_table().items():
        print(f"  {name:18s} to t = {end}" + "".join(f"{v:7.2f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
