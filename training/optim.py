"""Fused Adam / AdamW with the EMA of the weights: a few kernels per step instead of a dozen
element-wise ops per tensor.

Jittor's ``jt.optim.AdamW.step`` builds, for each parameter tensor, the chain
p *= 1 - lr wd; m = b0 m + (1-b0) g; v = b1 v + (1-b1) g^2; p -= lr/(1-b0^n) m / (sqrt(v)/sqrt(1-b1^n) + eps)
as separate ops (each a kernel on the CPU, one core), and the EMA adds two more per tensor. Here the
same arithmetic, and the EMA ``e = d e + (1-d) p`` of the new weights, runs as one ``jt.code`` op per
chunk of ``CHUNK`` tensors: on the CPU C++ with OpenMP (``training/optim_kernels.h``, one thread
team per op), on CUDA one kernel launch per tensor inside one op. Memory is read and written once.

``FusedAdam`` subclasses Jittor's ``Optimizer``, so ``backward``, ``zero_grad``, ``n_step``,
``param_groups[0]["grads"]`` and the MPI all-reduce of gradients behave as in Jittor's own, and it
keeps its moments where Jittor's Adam/AdamW do (``param_groups[0]["m"]``, ``["values"]``): the
checkpoint layout (``training/state.py``) is unchanged, old checkpoints load and a resume is
bit-exact. ``decoupled=True`` is ``jt.optim.AdamW``; ``decoupled=False`` is ``jt.optim.Adam``
(weight decay added to the gradient, eps outside the bias correction).
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Sequence

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

CHUNK = 64                      # tensors per op: bounds the op's source text and input count
PARALLEL_MIN_ELEMENTS = 65536   # below this many elements in a chunk, one thread (see models/kernels.py)
KERNELS_HEADER = Path(__file__).with_name("optim_kernels.h")

_CUDA_HEADER = r"""
struct IidmAdamCoefficients { float b0, b1, decay_factor, l2, step_size, sqrt_bc2, eps, ema_decay; };
__global__ void iidm_adam_ema(long n, const float* p, const float* g, const float* m, const float* v,
                              const float* e, float* p_out, float* m_out, float* v_out, float* e_out,
                              IidmAdamCoefficients c) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float gi = g[i] + c.l2 * p[i];
        const float mi = c.b0 * m[i] + (1.0f - c.b0) * gi;
        const float vi = c.b1 * v[i] + (1.0f - c.b1) * gi * gi;
        const float pi = p[i] * c.decay_factor - c.step_size * mi / (sqrtf(vi) / c.sqrt_bc2 + c.eps);
        m_out[i] = mi; v_out[i] = vi; p_out[i] = pi;
        if (e != nullptr) e_out[i] = c.ema_decay * e[i] + (1.0f - c.ema_decay) * pi;
    }
}
"""

_COEFFICIENTS = ('{(float)data["b0"], (float)data["b1"], (float)data["decay_factor"], (float)data["l2"], '
                 '(float)data["step_size"], (float)data["sqrt_bc2"], (float)data["eps"], (float)data["ema_decay"]}')


@functools.lru_cache(maxsize=None)
def _cpu_header() -> str:
    """An include of the header by absolute path, tagged with its content hash (so an edited
    header compiles anew: Jittor keys a kernel by its source text)."""
    digest = hashlib.sha1(KERNELS_HEADER.read_bytes()).hexdigest()[:16]
    path = str(KERNELS_HEADER.resolve()).replace("\\", "/")
    return f'#include "{path}"  // content {digest}\n'


def _calls(count: int, with_ema: bool, call: str) -> str:
    per_in, per_out = (5, 4) if with_ema else (4, 3)
    lines = []
    for k in range(count):
        i, o = k * per_in, k * per_out
        e_in = f"in{i + 4}_p" if with_ema else "nullptr"
        e_out = f"out{o + 3}_p" if with_ema else "nullptr"
        lines.append(call.format(n=f"in{i}->num", args=f"in{i}_p, in{i + 1}_p, in{i + 2}_p, in{i + 3}_p, {e_in}, "
                                                       f"out{o}_p, out{o + 1}_p, out{o + 2}_p, {e_out}"))
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _cpu_source(count: int, with_ema: bool) -> str:
    calls = _calls(count, with_ema, "    iidm_optim::adam_ema({n}, {args}, c);")
    return ("const iidm_optim::AdamCoefficients c" + _COEFFICIENTS + ";\n"
            "#pragma omp parallel if ((long)data[\"elements\"] >= (long)data[\"parallel_min\"])\n{\n"
            + calls + "\n}\n")


@functools.lru_cache(maxsize=None)
def _cuda_source(count: int, with_ema: bool) -> str:
    calls = _calls(count, with_ema, "iidm_adam_ema<<<(int)std::min<long>(({n} + 255) / 256, 4096), 256>>>({n}, {args}, c);")
    return "const IidmAdamCoefficients c" + _COEFFICIENTS + ";\n" + calls + "\n"


def adam_ema_step(params: Sequence[jt.Var], grads: Sequence[jt.Var], m: Sequence[jt.Var], v: Sequence[jt.Var],
                  averages: Sequence[jt.Var] | None, *, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float, n_step: int, decoupled: bool = True, ema_decay: float = 0.0) -> None:
    """One Adam(W) step over float32 tensors, updating ``params``, ``m``, ``v`` (and the EMA
    ``averages`` of the new weights) in place (lazily, as ``Var.update`` does)."""
    b0, b1 = betas
    bc1, bc2 = 1.0 - b0 ** n_step, 1.0 - b1 ** n_step
    if decoupled:
        coefficients = dict(decay_factor=1.0 - lr * weight_decay, l2=0.0, step_size=lr / bc1, sqrt_bc2=math.sqrt(bc2))
    else:
        coefficients = dict(decay_factor=1.0, l2=weight_decay, step_size=lr * math.sqrt(bc2) / bc1, sqrt_bc2=1.0)
    with_ema = averages is not None
    rows = list(zip(params, grads, m, v, averages if with_ema else [None] * len(params)))
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        inputs, shapes = [], []
        for p, g, mi, vi, e in chunk:
            for x in (p, g, mi, vi) + ((e,) if with_ema else ()):
                if x.dtype != "float32":
                    raise TypeError(f"fused Adam works on float32 tensors, got {x.dtype}")
            inputs += [p, g.stop_grad(), mi, vi] + ([e] if with_ema else [])
            shapes += [p.shape] * (4 if with_ema else 3)
        data = dict(b0=b0, b1=b1, eps=eps, ema_decay=ema_decay, elements=sum(p.numel() for p, *_ in chunk),
                    parallel_min=PARALLEL_MIN_ELEMENTS, **coefficients)
        outputs = jt.code(shapes, ["float32"] * len(shapes), inputs, data=data,
                          cpu_header=_cpu_header(), cpu_src=_cpu_source(len(chunk), with_ema),
                          cuda_header=_CUDA_HEADER, cuda_src=_cuda_source(len(chunk), with_ema))
        per_out = 4 if with_ema else 3
        for k, (p, _, mi, vi, e) in enumerate(chunk):
            p.update(outputs[k * per_out])
            mi.update(outputs[k * per_out + 1])
            vi.update(outputs[k * per_out + 2])
            if with_ema:
                e.update(outputs[k * per_out + 3])


class FusedAdam(jt.optim.Optimizer):
    """Adam (``decoupled=False``, as ``jt.optim.Adam``) or AdamW (``decoupled=True``, as
    ``jt.optim.AdamW``) over float32 parameters, with an optional EMA fused into the same kernels."""

    def __init__(self, params, lr: float, eps: float = 1e-8, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, decoupled: bool = True):
        super().__init__(params, lr)
        self.eps, self.betas, self.weight_decay, self.decoupled = eps, tuple(betas), weight_decay, decoupled
        for group in self.param_groups:
            group["values"] = [jt.zeros(p.shape, p.dtype).stop_grad() for p in group["params"]]
            group["m"] = [jt.zeros(p.shape, p.dtype).stop_grad() for p in group["params"]]

    def add_param_group(self, group):
        raise NotImplementedError("FusedAdam takes all its parameters at construction")

    def step(self, loss=None, retain_graph: bool = False, ema: Sequence[jt.Var] | None = None,
             ema_decay: float = 0.0) -> None:
        """One update (``loss`` given: its backward first, as Jittor's optimizers do); with ``ema``,
        also ``ema = ema_decay * ema + (1 - ema_decay) * new weights`` (averages in parameter order)."""
        self.pre_step(loss, retain_graph)
        for group in self.param_groups:
            keep = [k for k, p in enumerate(group["params"]) if not p.is_stop_grad()]
            pick = lambda xs: [xs[k] for k in keep]  # noqa: E731
            adam_ema_step(pick(group["params"]), pick(group["grads"]), pick(group["m"]), pick(group["values"]),
                          pick(list(ema)) if ema is not None else None,
                          lr=group.get("lr", self.lr), betas=group.get("betas", self.betas),
                          eps=group.get("eps", self.eps), weight_decay=group.get("weight_decay", self.weight_decay),
                          n_step=int(self.n_step), decoupled=self.decoupled, ema_decay=ema_decay)
        self.post_step()


    def step_gradients(self, grads: Sequence[jt.Var], ema: Sequence[jt.Var] | None = None,
                       ema_decay: float = 0.0) -> list[jt.Var]:
        """One update, counted as the next one, from gradients computed elsewhere (summed over
        micro-batches, averaged over MPI ranks, unscaled); returns the moments it wrote, for a sync."""
        group = self.param_groups[0]
        group["grads"] = [g.stop_grad() for g in grads]
        self.n_step += 1
        self.step(ema=ema, ema_decay=ema_decay)
        return list(group["m"]) + list(group["values"])


def FusedAdamW(params, lr: float, eps: float = 1e-8, betas=(0.9, 0.999), weight_decay: float = 0.0) -> FusedAdam:
    """``jt.optim.AdamW``'s signature and arithmetic, fused."""
    return FusedAdam(params, lr, eps=eps, betas=betas, weight_decay=weight_decay, decoupled=True)


def finite_gradients(optimizer, loss: jt.Var) -> bool:
    """Backward ``loss`` into ``optimizer`` (no update yet); whether the loss and every gradient
    are finite."""
    optimizer.backward(loss)
    grads = optimizer.param_groups[0]["grads"]
    sq = sum((g * g).sum() for g in grads)
    jt.sync([loss, sq])
    return math.isfinite(float(loss.item())) and math.isfinite(float(sq.item()))


def discard_gradients(optimizer) -> None:
    """Drops the gradients ``finite_gradients`` computed, for a step that is not taken."""
    optimizer.n_step -= 1     # backward counted a step that is not taken
    optimizer.zero_grad()
