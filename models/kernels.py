"""Multi-threaded CPU kernels for the U-Net's hot non-convolution ops (C++ and OpenMP via ``jt.code``).

On the CPU Jittor runs its own generated kernels (element-wise ops, reductions, batched matmul)
on one core; only oneDNN ops (convolution, 2-D matmul) use every core (DESIGN §7). The kernels
here are written as ``jt.code`` C++ with ``#pragma omp parallel for`` (Jittor compiles CPU kernels
with ``-fopenmp -Ofast``), each wrapped in a ``jt.Function`` whose ``grad`` is another such kernel:

* ``group_norm_act``: group normalisation with a two-pass variance (the mean first, sums in
  float64), fused with what follows it in the U-Net: the affine weight and bias, SPADE's per-pixel
  modulation, the timestep FiLM and SiLU (one kernel where the plain path runs a chain of
  single-threaded reductions and element-wise ops, and keeps their intermediates for backward).
* ``silu``: x * sigmoid(x).
* ``qkv_attention_legacy``: guided-diffusion's legacy-layout attention, per head two oneDNN sgemm
  calls (the library Jittor's 2-D matmul uses) around a softmax; backward four sgemm calls and
  the softmax gradient. Measured on the 2-core CPU at 8 heads x 64 channels x 768 positions:
  forward / forward+backward 134 / 851 ms with Jittor's batched matmul (one core), 186 / 441 ms
  with per-head 2-D ``nn.matmul`` calls, 19 / 62 ms with this kernel (same machine load); at the
  small shapes of the tiny and demo presets batched beat per-head, and the kernel beat both.

These functions do no device check: ``models/layers.py`` decides when they are used (float32
tensors on the CPU) and keeps the plain Jittor ops as the reference path. All tensors are float32
and contiguous (Jittor Vars are); shapes are runtime values, so each variant compiles once.
"""

from __future__ import annotations

import functools
import math

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

# Below this many elements (256 KiB of float32) one thread is used: splitting saves microseconds
# there, while waking a second thread that shares its core with another job can cost a scheduler
# time slice (milliseconds). Read at every call and passed as data, so changing it (tests force
# the threaded path with 0) compiles nothing.
PARALLEL_MIN_ELEMENTS = 65536

_HEADER = "#include <cmath>\n#include <omp.h>\n"

# oneDNN's C API (dnnl.h, DNNL 2.2 shipped by jittor-offline); the library is already loaded by
# Jittor's own matmul and convolution ops, so the kernel only declares the function.
_SGEMM_HEADER = _HEADER + """#include <cstdint>
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                          float* C, int64_t ldc);
"""


def _pointer_lines(names: tuple[str, ...], present: tuple[str, ...], prefix: str, const: bool) -> str:
    """C++ lines binding readable names to the op's ``in{k}_p`` / ``out{k}_p`` pointers (k is
    the position in ``present``); names absent from this variant get a null pointer (their
    branches are compiled out)."""
    qualifier = "const float* __restrict__" if const else "float* __restrict__"
    lines = []
    for name in names:
        if name in present:
            lines.append(f"{qualifier} {name} = {prefix}{present.index(name)}_p;")
        else:
            lines.append(f"{qualifier} {name} = nullptr;")
    return "\n".join(lines)


def _flags(affine: bool, spatial: bool, channel: bool, silu: bool) -> str:
    return (f"const bool AFFINE = {str(affine).lower()}, SPATIAL = {str(spatial).lower()}, "
            f"CHANNEL = {str(channel).lower()}, SILU = {str(silu).lower()};\n")


# z = (x - mean) * rstd * weight_c + bias_c;  z = z * (1 + gamma) + beta;
# z = z * (1 + scale_nc) + shift_nc;  y = z * sigmoid(z).  One task per (sample, group).
_GROUP_NORM_FORWARD = """
const int N = in0_shape0, C = in0_shape1;
const long S = in0_shape2;
const int G = (int)data["groups"];
const float eps = (float)data["eps"];
const int Cg = C / G;
const long L = (long)Cg * S;
#pragma omp parallel for schedule(static) if ((long)N * C * S >= PARALLEL_MIN)
for (int task = 0; task < N * G; task++) {
    const int n = task / G, g = task % G;
    const long base = ((long)n * C + (long)g * Cg) * S;
    double sum = 0.0;
    #pragma omp simd reduction(+:sum)
    for (long i = 0; i < L; i++) sum += x[base + i];
    const float mu = (float)(sum / (double)L);
    double squares = 0.0;
    #pragma omp simd reduction(+:squares)
    for (long i = 0; i < L; i++) {
        const float d = x[base + i] - mu;
        squares += (double)d * (double)d;
    }
    const float rs = (float)(1.0 / std::sqrt(squares / (double)L + (double)eps));
    mean[task] = mu;
    rstd[task] = rs;
    for (int cc = 0; cc < Cg; cc++) {
        const int c = g * Cg + cc;
        const long off = ((long)n * C + c) * S;
        const float a = AFFINE ? rs * weight[c] : rs;
        const float b = AFFINE ? bias[c] : 0.0f;
        const float sc = CHANNEL ? 1.0f + scale[(long)n * C + c] : 1.0f;
        const float sh = CHANNEL ? shift[(long)n * C + c] : 0.0f;
        #pragma omp simd
        for (long s = 0; s < S; s++) {
            float z = (x[off + s] - mu) * a + b;
            if (SPATIAL) z = z * (1.0f + gamma[off + s]) + beta[off + s];
            if (CHANNEL) z = z * sc + sh;
            if (SILU) z = z / (1.0f + std::exp(-z));
            y[off + s] = z;
        }
    }
}
"""

# Backward of the forward above. Per element, with xh = (x - mean) * rstd:
#   u = xh * w + b,  m = u * (1 + gamma) + beta,  z = m * (1 + scale) + shift
#   gz = gy * sig(z) * (1 + z * (1 - sig(z)))          (SiLU')
#   dshift_nc = sum gz, dscale_nc = sum gz * m;  gm = gz * (1 + scale)
#   dbeta = gm, dgamma = gm * u;                  gu = gm * (1 + gamma)
#   dweight_nc = sum gu * xh, dbias_nc = sum gu;  gxh = gu * w
#   dx = rstd * (gxh - mean_group(gxh) - xh * mean_group(gxh * xh))
# The per-channel sums are per sample ([N, C]); the caller sums them over N.
_GROUP_NORM_BACKWARD = """
const int N = in0_shape0, C = in0_shape1;
const long S = in0_shape2;
const int G = (int)data["groups"];
const int Cg = C / G;
const long L = (long)Cg * S;
#pragma omp parallel for schedule(static) if ((long)N * C * S >= PARALLEL_MIN)
for (int task = 0; task < N * G; task++) {
    const int n = task / G, g = task % G;
    const float mu = mean[task], rs = rstd[task];
    double sum_g = 0.0, sum_gx = 0.0;
    for (int cc = 0; cc < Cg; cc++) {
        const int c = g * Cg + cc;
        const long nc = (long)n * C + c;
        const long off = nc * S;
        const float w = AFFINE ? weight[c] : 1.0f;
        const float b = AFFINE ? bias[c] : 0.0f;
        const float sc = CHANNEL ? 1.0f + scale[nc] : 1.0f;
        const float sh = CHANNEL ? shift[nc] : 0.0f;
        double acc_w = 0.0, acc_b = 0.0, acc_sc = 0.0, acc_sh = 0.0;
        #pragma omp simd reduction(+:sum_g, sum_gx, acc_w, acc_b, acc_sc, acc_sh)
        for (long s = 0; s < S; s++) {
            const float xh = (x[off + s] - mu) * rs;
            const float u = xh * w + b;
            const float m = SPATIAL ? u * (1.0f + gamma[off + s]) + beta[off + s] : u;
            float gz = gy[off + s];
            if (SILU) {
                const float z = m * sc + sh;
                const float sig = 1.0f / (1.0f + std::exp(-z));
                gz *= sig * (1.0f + z * (1.0f - sig));
            }
            if (CHANNEL) { acc_sh += gz; acc_sc += gz * m; }
            const float gm = gz * sc;
            float gu = gm;
            if (SPATIAL) {
                dbeta[off + s] = gm;
                dgamma[off + s] = gm * u;
                gu = gm * (1.0f + gamma[off + s]);
            }
            if (AFFINE) { acc_w += gu * xh; acc_b += gu; }
            const float gxh = gu * w;
            sum_g += gxh;
            sum_gx += gxh * xh;
            dx[off + s] = gxh;
        }
        if (AFFINE) { dweight[nc] = (float)acc_w; dbias[nc] = (float)acc_b; }
        if (CHANNEL) { dscale[nc] = (float)acc_sc; dshift[nc] = (float)acc_sh; }
    }
    const float m1 = (float)(sum_g / (double)L), m2 = (float)(sum_gx / (double)L);
    const long base = ((long)n * C + (long)g * Cg) * S;
    #pragma omp simd
    for (long i = 0; i < L; i++) {
        const float xh = (x[base + i] - mu) * rs;
        dx[base + i] = rs * (dx[base + i] - m1 - xh * m2);
    }
}
"""


def _data(**values: float) -> dict[str, float]:
    return {"parallel_min": float(PARALLEL_MIN_ELEMENTS), **{k: float(v) for k, v in values.items()}}


@functools.lru_cache(maxsize=None)
def _source(body: str, inputs: tuple[str, ...], outputs: tuple[str, ...],
            input_names: tuple[str, ...], output_names: tuple[str, ...], flags: str = "") -> str:
    """The kernel source of one variant (cached: the U-Net calls each variant many times)."""
    return ('const long PARALLEL_MIN = (long)data["parallel_min"];\n' + flags
            + _pointer_lines(input_names, inputs, "in", const=True) + "\n"
            + _pointer_lines(output_names, outputs, "out", const=False) + "\n" + body)


_GN_INPUTS = ("x", "weight", "bias", "gamma", "beta", "scale", "shift")
_GN_GRAD_INPUTS = ("x", "mean", "rstd", "weight", "bias", "gamma", "beta", "scale", "shift", "gy")
_GN_GRAD_OUTPUTS = ("dx", "dweight", "dbias", "dgamma", "dbeta", "dscale", "dshift")


class _GroupNormAct(jt.Function):
    """The fused group norm as a ``jt.Function``: inputs x [N, C, S] and the optional weight,
    bias [C], gamma, beta [N, C, S], scale, shift [N, C]; one output [N, C, S]."""

    def __init__(self, num_groups: int, eps: float, silu: bool):
        self.num_groups, self.eps, self.silu = num_groups, eps, silu

    def execute(self, x, weight, bias, gamma, beta, scale, shift):
        self.affine, self.spatial, self.channel = weight is not None, gamma is not None, scale is not None
        values = (x, weight, bias, gamma, beta, scale, shift)
        present = tuple(name for name, value in zip(_GN_INPUTS, values) if value is not None)
        src = _source(_GROUP_NORM_FORWARD, present, ("y", "mean", "rstd"), _GN_INPUTS,
                      ("y", "mean", "rstd"), _flags(self.affine, self.spatial, self.channel, self.silu))
        n = x.shape[0]
        y, mean, rstd = jt.code(
            [x.shape, (n, self.num_groups), (n, self.num_groups)], ["float32"] * 3,
            [value for value in values if value is not None], cpu_header=_HEADER, cpu_src=src,
            data=_data(groups=self.num_groups, eps=self.eps))
        self.saved = (x, mean, rstd, weight, bias, gamma, beta, scale, shift)
        return y

    def grad(self, grad_y):
        x, mean, rstd, weight, bias, gamma, beta, scale, shift = self.saved
        values = (x, mean, rstd, weight, bias, gamma, beta, scale, shift, grad_y)
        present = tuple(name for name, value in zip(_GN_GRAD_INPUTS, values) if value is not None)
        n, c, _ = x.shape
        outputs = {"dx": x.shape}
        if self.affine:
            outputs.update(dweight=(n, c), dbias=(n, c))
        if self.spatial:
            outputs.update(dgamma=x.shape, dbeta=x.shape)
        if self.channel:
            outputs.update(dscale=(n, c), dshift=(n, c))
        src = _source(_GROUP_NORM_BACKWARD, present, tuple(outputs), _GN_GRAD_INPUTS, _GN_GRAD_OUTPUTS,
                      _flags(self.affine, self.spatial, self.channel, self.silu))
        results = jt.code(list(outputs.values()), ["float32"] * len(outputs),
                          [value for value in values if value is not None], cpu_header=_HEADER,
                          cpu_src=src, data=_data(groups=self.num_groups))
        got = dict(zip(outputs, results))
        return (got["dx"],
                got["dweight"].sum(0) if self.affine else None,
                got["dbias"].sum(0) if self.affine else None,
                got.get("dgamma"), got.get("dbeta"), got.get("dscale"), got.get("dshift"))


def group_norm_act(x: jt.Var, num_groups: int, weight: jt.Var | None = None,
                   bias: jt.Var | None = None, eps: float = 1e-5, *, gamma: jt.Var | None = None,
                   beta: jt.Var | None = None, scale: jt.Var | None = None,
                   shift: jt.Var | None = None, silu: bool = False) -> jt.Var:
    """Fused group norm on x [N, C, *spatial] (float32):

        z = (x - mean_g) / sqrt(var_g + eps) * weight_c + bias_c     var_g = mean_g((x - mean_g)^2)
        z = z * (1 + gamma) + beta        SPADE (Park et al. 2019); gamma, beta shaped like x
        z = z * (1 + scale_nc) + shift_nc  timestep FiLM; scale, shift [N, C] or [N, C, 1, ...]
        y = z * sigmoid(z)                 when ``silu``

    Each optional pair applies only when given. Statistics are per (sample, group) over the
    group's C / num_groups channels and all positions, summed in float64.
    """
    shape = x.shape
    n, c = shape[0], shape[1]
    if c % num_groups:
        raise ValueError(f"group_norm_act: {c} channels are not divisible into {num_groups} groups")
    if (weight is None) != (bias is None):
        raise ValueError("group_norm_act: give weight and bias together (or neither)")
    if (gamma is None) != (beta is None):
        raise ValueError("group_norm_act: give gamma and beta together (or neither)")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_act: give scale and shift together (or neither)")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and list(value.shape) != [c]:
            raise ValueError(f"group_norm_act: {name} must be [C] = [{c}], got {list(value.shape)}")
    for name, value in (("gamma", gamma), ("beta", beta)):
        if value is not None and list(value.shape) != list(shape):
            raise ValueError(f"group_norm_act: {name} must be shaped like x {list(shape)}, "
                             f"got {list(value.shape)}")
    for name, value in (("scale", scale), ("shift", shift)):
        if value is not None and (list(value.shape[:2]) != [n, c] or any(d != 1 for d in value.shape[2:])):
            raise ValueError(f"group_norm_act: {name} must be [N, C] = [{n}, {c}] (trailing 1s "
                             f"allowed), got {list(value.shape)}")
    flat = (n, c, -1)
    y = _GroupNormAct(num_groups, eps, silu)(
        x.reshape(flat), weight, bias,
        None if gamma is None else gamma.reshape(flat), None if beta is None else beta.reshape(flat),
        None if scale is None else scale.reshape((n, c)), None if shift is None else shift.reshape((n, c)))
    return y.reshape(shape)


_SILU_FORWARD = """
const long total = in0->num;
#pragma omp parallel for simd schedule(static) if (total >= PARALLEL_MIN)
for (long i = 0; i < total; i++) {
    const float v = x[i];
    y[i] = v / (1.0f + std::exp(-v));
}
"""

# d/dx [x * sig(x)] = sig(x) * (1 + x * (1 - sig(x)))
_SILU_BACKWARD = """
const long total = in0->num;
#pragma omp parallel for simd schedule(static) if (total >= PARALLEL_MIN)
for (long i = 0; i < total; i++) {
    const float v = x[i];
    const float sig = 1.0f / (1.0f + std::exp(-v));
    dx[i] = gy[i] * sig * (1.0f + v * (1.0f - sig));
}
"""


class _SiLU(jt.Function):
    def execute(self, x):
        self.x = x
        src = _source(_SILU_FORWARD, ("x",), ("y",), ("x",), ("y",))
        return jt.code(x.shape, "float32", [x], cpu_header=_HEADER, cpu_src=src, data=_data())

    def grad(self, grad_y):
        src = _source(_SILU_BACKWARD, ("x", "gy"), ("dx",), ("x", "gy"), ("dx",))
        return jt.code(self.x.shape, "float32", [self.x, grad_y], cpu_header=_HEADER,
                       cpu_src=src, data=_data())


def silu(x: jt.Var) -> jt.Var:
    """SiLU / swish x * sigmoid(x) of a float32 tensor of any shape."""
    return _SiLU()(x)


def has_sgemm() -> bool:
    """True when Jittor loaded its oneDNN ops (``use_mkl``), which provide ``dnnl_sgemm``."""
    from jittor import compile_extern

    return getattr(compile_extern, "mkl_ops", None) is not None


# Row-major sgemm on per-head blocks q, k, v [c, T] of qkv [B*H, 3c, T]:
#   w = alpha * q^T k [T, S];  w = softmax_s(w);  out = v w^T [c, T].
# Heads run in parallel when there are at least as many as threads (sgemm then runs on one
# thread); otherwise heads run in turn and sgemm and the softmax rows use the threads.
_ATTENTION_FORWARD = """
const int64_t BH = out0_shape0, C = out0_shape1, T = out0_shape2;
const float alpha = (float)data["alpha"];
const bool across_heads = BH >= omp_get_max_threads();
#pragma omp parallel for schedule(static) if (across_heads)
for (int64_t h = 0; h < BH; h++) {
    const float* q = qkv + h * 3 * C * T;
    const float* k = q + C * T;
    const float* v = k + C * T;
    float* w = weight + h * T * T;
    dnnl_sgemm('T', 'N', T, T, C, alpha, q, T, k, T, 0.0f, w, T);
    #pragma omp parallel for schedule(static) if (!across_heads && T * T >= PARALLEL_MIN)
    for (int64_t t = 0; t < T; t++) {
        float* row = w + t * T;
        float top = row[0];
        for (int64_t s = 1; s < T; s++) top = row[s] > top ? row[s] : top;
        double total = 0.0;
        #pragma omp simd reduction(+:total)
        for (int64_t s = 0; s < T; s++) {
            const float e = std::exp(row[s] - top);
            row[s] = e;
            total += e;
        }
        const float inverse = (float)(1.0 / total);
        #pragma omp simd
        for (int64_t s = 0; s < T; s++) row[s] *= inverse;
    }
    dnnl_sgemm('N', 'T', C, T, T, 1.0f, v, T, w, T, 0.0f, o + h * C * T, T);
}
"""

# Given g = d loss / d out [c, T] per head and the saved softmax w [T, S]:
#   dv = g w;  dw = g^T v;  dw_ts = w_ts (dw_ts - sum_s' dw_ts' w_ts')   (softmax')
#   dq = alpha k dw^T;  dk = alpha q dw
_ATTENTION_BACKWARD = """
const int64_t BH = in1_shape0, T = in1_shape1, C = in2_shape1;
const float alpha = (float)data["alpha"];
const bool across_heads = BH >= omp_get_max_threads();
#pragma omp parallel for schedule(static) if (across_heads)
for (int64_t h = 0; h < BH; h++) {
    const float* q = qkv + h * 3 * C * T;
    const float* k = q + C * T;
    const float* v = k + C * T;
    const float* w = weight + h * T * T;
    const float* g = gy + h * C * T;
    float* dq = dqkv + h * 3 * C * T;
    float* dk = dq + C * T;
    float* dv = dk + C * T;
    float* dw = dweight + h * T * T;
    dnnl_sgemm('N', 'N', C, T, T, 1.0f, g, T, w, T, 0.0f, dv, T);
    dnnl_sgemm('T', 'N', T, T, C, 1.0f, g, T, v, T, 0.0f, dw, T);
    #pragma omp parallel for schedule(static) if (!across_heads && T * T >= PARALLEL_MIN)
    for (int64_t t = 0; t < T; t++) {
        float* row = dw + t * T;
        const float* wrow = w + t * T;
        double dot = 0.0;
        #pragma omp simd reduction(+:dot)
        for (int64_t s = 0; s < T; s++) dot += row[s] * wrow[s];
        const float d = (float)dot;
        #pragma omp simd
        for (int64_t s = 0; s < T; s++) row[s] = wrow[s] * (row[s] - d);
    }
    dnnl_sgemm('N', 'T', C, T, T, alpha, k, T, dw, T, 0.0f, dq, T);
    dnnl_sgemm('N', 'N', C, T, T, alpha, q, T, dw, T, 0.0f, dk, T);
}
"""


class _QKVAttentionLegacy(jt.Function):
    def __init__(self, num_heads: int):
        self.num_heads = num_heads

    def execute(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.num_heads)
        heads = bs * self.num_heads
        # (q / c^(1/4))^T (k / c^(1/4)) = q^T k / sqrt(c)
        self.alpha = 1.0 / math.sqrt(ch)
        per_head = qkv.reshape((heads, 3 * ch, length))
        src = _source(_ATTENTION_FORWARD, ("qkv",), ("o", "weight"), ("qkv",), ("o", "weight"))
        out, weight = jt.code([(heads, ch, length), (heads, length, length)], ["float32"] * 2,
                              [per_head], cpu_header=_SGEMM_HEADER, cpu_src=src,
                              data=_data(alpha=self.alpha))
        self.saved = (per_head, weight, qkv.shape)
        return out.reshape((bs, self.num_heads * ch, length))

    def grad(self, grad_out):
        per_head, weight, shape = self.saved
        heads, width, length = per_head.shape
        src = _source(_ATTENTION_BACKWARD, ("qkv", "weight", "gy"), ("dqkv", "dweight"),
                      ("qkv", "weight", "gy"), ("dqkv", "dweight"))
        dqkv, _ = jt.code([per_head.shape, weight.shape], ["float32"] * 2,
                          [per_head, weight, grad_out.reshape((heads, width // 3, length))],
                          cpu_header=_SGEMM_HEADER, cpu_src=src, data=_data(alpha=self.alpha))
        return dqkv.reshape(shape)


def qkv_attention_legacy(qkv: jt.Var, num_heads: int) -> jt.Var:
    """Attention on qkv [B, H * 3 * c, T] (float32) in guided-diffusion's legacy layout ->
    [B, H * c, T]: per head out = v softmax_s(q^T k / sqrt(c))^T. Needs ``has_sgemm()``."""
    bs, width, _ = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv_attention_legacy: width {width} is not 3 x {num_heads} heads x c")
    return _QKVAttentionLegacy(num_heads)(qkv)
