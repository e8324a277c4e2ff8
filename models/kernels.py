"""Multi-threaded CPU kernels for the U-Net's hot non-convolution ops (C++ and OpenMP via ``jt.code``).

On the CPU Jittor runs its own generated kernels (element-wise ops, reductions, batched matmul)
on one core; only oneDNN ops (convolution, 2-D matmul) use every core. The kernels
here are C++ with OpenMP in ``models/cpu_kernels.h``, run as ``jt.code`` ops (Jittor compiles CPU
kernels with ``-fopenmp -Ofast -march=native``) whose source is a one-line call into that header,
each wrapped in a ``jt.Function`` whose ``grad`` is another such op:

* ``group_norm_act``: group normalisation with a two-pass variance (the mean first; sums in
  float32 within blocks of 256 elements and float64 across blocks), fused with what follows it
  in the U-Net: the affine weight and bias, SPADE's per-pixel modulation, the timestep FiLM and
  SiLU (one kernel where the plain path runs a chain of single-threaded reductions and
  element-wise ops, and keeps their intermediates for backward).
* ``silu``: x * sigmoid(x).
* ``qkv_attention_legacy``: guided-diffusion's legacy-layout attention, per head two oneDNN sgemm
  calls (the library Jittor's 2-D matmul uses) around a softmax; backward four sgemm calls and
  the softmax gradient. Measured on the 2-core CPU at 8 heads x 64 channels x 768 positions:
  forward / forward+backward 134 / 851 ms with Jittor's batched matmul (one core), 186 / 441 ms
  with per-head 2-D ``nn.matmul`` calls, 19 / 62 ms with this kernel (same machine load); at the
  small shapes of the tiny and demo presets batched beat per-head, and the kernel beat both.
* ``conv2d``: oneDNN's convolution forward (the library Jittor's own convolution op calls), C++ in
  ``models/cpu_conv.h``, keeping per geometry what Jittor's op rebuilds on every call (the
  primitive, the reorders between NCHW and the primitive's layout), adding the bias inside the
  convolution (Jittor adds it in a separate single-threaded op) and running stride-1 1x1
  convolutions as one sgemm per image on NCHW (no reorder). Backward is Jittor's own oneDNN
  convolution-backward ops. Measured on the 2-core CPU (docs/benchmarks.md), forward time over
  Jittor's op: 0.4-0.98x at the U-Net's 3x3 shapes, 0.04-0.5x at its 1x1 shapes.

These functions do no device check: ``models/layers.py`` decides when they are used (float32
tensors on the CPU) and keeps the plain Jittor ops as the reference path. All tensors are float32
and contiguous (Jittor Vars are); shapes are runtime values, so each variant compiles once (and
again when the header's content changes: its hash is part of the op's header text).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

import jittor_env  # noqa: F401  (must precede jittor)
import jittor as jt

# Below this many elements (256 KiB of float32) one thread is used: splitting saves microseconds
# there, while waking a second thread that shares its core with another job can cost a scheduler
# time slice (milliseconds). Read at every call and passed as data, so changing it (tests force
# the threaded path with 0) compiles nothing.
PARALLEL_MIN_ELEMENTS = 65536

KERNELS_HEADER = Path(__file__).with_name("cpu_kernels.h")
CONV_HEADER = Path(__file__).with_name("cpu_conv.h")


@functools.lru_cache(maxsize=None)
def _include(header: Path) -> str:
    """An include of ``header`` by absolute path, tagged with a hash of its content. Jittor names
    a compiled kernel by its source text, in which an included file appears only as this line;
    the hash makes an edited header compile anew."""
    digest = hashlib.sha1(header.read_bytes()).hexdigest()[:16]
    path = str(header.resolve()).replace("\\", "/")
    return f'#include "{path}"  // content {digest}\n'


@functools.lru_cache(maxsize=None)
def _header(with_sgemm: bool = False) -> str:
    """The ops' ``cpu_header``: an include of ``cpu_kernels.h``."""
    define = "#define IIDM_WITH_SGEMM\n" if with_sgemm else ""
    return define + _include(KERNELS_HEADER)


@functools.lru_cache(maxsize=256)
def _data(parallel_min: int, **values: float) -> dict[str, float]:
    """An op's ``data`` (cached: one dict per distinct value, shared and never modified)."""
    return {"parallel_min": float(parallel_min), **{k: float(v) for k, v in values.items()}}


def _arguments(names: tuple[str, ...], present: tuple[str, ...], prefix: str) -> str:
    """C++ arguments for ``names``: the op's ``{prefix}{k}_p`` pointer for the k-th name of
    ``present``, ``nullptr`` for the others."""
    return ", ".join(f"{prefix}{present.index(name)}_p" if name in present else "nullptr"
                     for name in names)


_FLOAT32 = ["float32"]
_GN_INPUTS = ("x", "weight", "bias", "gamma", "beta", "scale", "shift")
_GN_GRAD_INPUTS = ("x", "stats", "weight", "bias", "gamma", "beta", "scale", "shift", "gy")
_GN_GRAD_OUTPUTS = ("dx", "dweight", "dbias", "dgamma", "dbeta", "dscale", "dshift")
# N, C, S (positions per channel), groups, from the first input x [N, C, *spatial]
_GN_SIZES = 'in0_shape0, in0_shape1, in0->num / ((long)in0_shape0 * in0_shape1), (int)data["groups"]'


@functools.lru_cache(maxsize=None)
def _group_norm_sources(affine: bool, spatial: bool, channel: bool, silu: bool) -> tuple[str, str, tuple]:
    """(forward source, backward source, backward output names) of one variant: each source is
    one call of the header's template instantiated for the variant."""
    given = {"weight": affine, "bias": affine, "gamma": spatial, "beta": spatial,
             "scale": channel, "shift": channel}
    inputs = tuple(name for name in _GN_INPUTS if given.get(name, True))
    grad_inputs = tuple(name for name in _GN_GRAD_INPUTS if given.get(name, True))
    grad_outputs = tuple(name for name in _GN_GRAD_OUTPUTS if given.get(name[1:], True))
    variant = ", ".join(str(flag).lower() for flag in (affine, spatial, channel, silu))
    forward = (f"iidm::group_norm_forward<{variant}>({_arguments(_GN_INPUTS, inputs, 'in')}, "
               f"out0_p, out1_p, {_GN_SIZES}, (float)data[\"eps\"], (long)data[\"parallel_min\"]);")
    backward = (f"iidm::group_norm_backward<{variant}>("
                f"{_arguments(_GN_GRAD_INPUTS, grad_inputs, 'in')}, "
                f"{_arguments(_GN_GRAD_OUTPUTS, grad_outputs, 'out')}, {_GN_SIZES}, "
                f"(long)data[\"parallel_min\"]);")
    return forward, backward, grad_outputs


def _group_norm_forward(x, weight, bias, gamma, beta, scale, shift, num_groups: int, eps: float,
                        silu: bool) -> tuple[jt.Var, jt.Var, dict]:
    """(y, stats [N, G, 2], the op's data) from one forward op."""
    forward, _, _ = _group_norm_sources(weight is not None, gamma is not None, scale is not None, silu)
    data = _data(PARALLEL_MIN_ELEMENTS, groups=num_groups, eps=eps)
    y, stats = jt.code([x.shape, (x.shape[0], num_groups, 2)], _FLOAT32 * 2,
                       [v for v in (x, weight, bias, gamma, beta, scale, shift) if v is not None],
                       cpu_header=_header(), cpu_src=forward, data=data)
    return y, stats, data


class _GroupNormAct(jt.Function):
    """The fused group norm as a ``jt.Function``: inputs x [N, C, *spatial] and the optional
    weight, bias [C], gamma, beta shaped like x, scale, shift [N, C, 1, ...]; one output like x.
    The kernels index scale and shift as [N, C] and x, gamma, beta as [N, C, S], so nothing is
    reshaped (a reshape is one more op to create and run, and at the small shapes creating and
    running ops is a large part of a call's time)."""

    def __init__(self, num_groups: int, eps: float, silu: bool):
        self.num_groups, self.eps, self.silu = num_groups, eps, silu

    def execute(self, x, weight, bias, gamma, beta, scale, shift):
        y, stats, self.data = _group_norm_forward(x, weight, bias, gamma, beta, scale, shift,
                                                  self.num_groups, self.eps, self.silu)
        self.saved = (x, stats, weight, bias, gamma, beta, scale, shift)
        return y

    def grad(self, grad_y):
        x, stats, weight, bias, gamma, beta, scale, shift = self.saved
        _, backward, names = _group_norm_sources(weight is not None, gamma is not None,
                                                 scale is not None, self.silu)
        per_channel = (x.shape[0], x.shape[1])
        shapes = {"dx": x.shape, "dweight": per_channel, "dbias": per_channel, "dgamma": x.shape,
                  "dbeta": x.shape, "dscale": None if scale is None else scale.shape,
                  "dshift": None if shift is None else shift.shape}
        results = jt.code(
            [shapes[name] for name in names], _FLOAT32 * len(names),
            [v for v in (x, stats, weight, bias, gamma, beta, scale, shift, grad_y) if v is not None],
            cpu_header=_header(), cpu_src=backward, data=self.data)
        got = dict(zip(names, results))
        affine = weight is not None
        return (got["dx"],
                got["dweight"].sum(0) if affine else None,
                got["dbias"].sum(0) if affine else None,
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
    group's C / num_groups channels and all positions (two passes; float64 across blocks).
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
    if weight is not None:
        for name, value in (("weight", weight), ("bias", bias)):
            if value.shape != [c]:
                raise ValueError(f"group_norm_act: {name} must be [C] = [{c}], got {list(value.shape)}")
    if gamma is not None:
        for name, value in (("gamma", gamma), ("beta", beta)):
            if value.shape != shape:
                raise ValueError(f"group_norm_act: {name} must be shaped like x {list(shape)}, "
                                 f"got {list(value.shape)}")
    if scale is not None:
        for name, value in (("scale", scale), ("shift", shift)):
            if value.shape[:2] != [n, c] or any(d != 1 for d in value.shape[2:]):
                raise ValueError(f"group_norm_act: {name} must be [N, C] = [{n}, {c}] (trailing 1s "
                                 f"allowed), got {list(value.shape)}")
    if jt.flags.no_grad:  # no tape to record: skip the Function object
        return _group_norm_forward(x, weight, bias, gamma, beta, scale, shift, num_groups, eps, silu)[0]
    return _GroupNormAct(num_groups, eps, silu)(x, weight, bias, gamma, beta, scale, shift)


_SILU_FORWARD = 'iidm::silu_forward(in0_p, out0_p, in0->num, (long)data["parallel_min"]);'
_SILU_BACKWARD = 'iidm::silu_backward(in0_p, in1_p, out0_p, in0->num, (long)data["parallel_min"]);'


def _silu_forward(x: jt.Var) -> jt.Var:
    return jt.code(x.shape, "float32", [x], cpu_header=_header(), cpu_src=_SILU_FORWARD,
                   data=_data(PARALLEL_MIN_ELEMENTS))


class _SiLU(jt.Function):
    def execute(self, x):
        self.x = x
        return _silu_forward(x)

    def grad(self, grad_y):
        return jt.code(self.x.shape, "float32", [self.x, grad_y], cpu_header=_header(),
                       cpu_src=_SILU_BACKWARD, data=_data(PARALLEL_MIN_ELEMENTS))


def silu(x: jt.Var) -> jt.Var:
    """SiLU / swish x * sigmoid(x) of a float32 tensor of any shape."""
    if jt.flags.no_grad:
        return _silu_forward(x)
    return _SiLU()(x)


def has_sgemm() -> bool:
    """True when Jittor loaded its oneDNN ops (``use_mkl``), which provide ``dnnl_sgemm``."""
    from jittor import compile_extern

    return getattr(compile_extern, "mkl_ops", None) is not None


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
        out, weight = jt.code(
            [(heads, ch, length), (heads, length, length)], _FLOAT32 * 2, [per_head],
            cpu_header=_header(with_sgemm=True),
            cpu_src='iidm::attention_forward(in0_p, out0_p, out1_p, out0_shape0, out0_shape1, '
                    'out0_shape2, (float)data["alpha"], (long)data["parallel_min"]);',
            data=_data(PARALLEL_MIN_ELEMENTS, alpha=self.alpha))
        self.saved = (per_head, weight, qkv.shape)
        return out.reshape((bs, self.num_heads * ch, length))

    def grad(self, grad_out):
        per_head, weight, shape = self.saved
        heads, width, length = per_head.shape
        dqkv, _ = jt.code(
            [per_head.shape, weight.shape], _FLOAT32 * 2,
            [per_head, weight, grad_out.reshape((heads, width // 3, length))],
            cpu_header=_header(with_sgemm=True),
            cpu_src='iidm::attention_backward(in0_p, in1_p, in2_p, out0_p, out1_p, in0_shape0, '
                    'in2_shape1, in0_shape2, (float)data["alpha"], (long)data["parallel_min"]);',
            data=_data(PARALLEL_MIN_ELEMENTS, alpha=self.alpha))
        return dqkv.reshape(shape)


def qkv_attention_legacy(qkv: jt.Var, num_heads: int) -> jt.Var:
    """Attention on qkv [B, H * 3 * c, T] (float32) in guided-diffusion's legacy layout ->
    [B, H * c, T]: per head out = v softmax_s(q^T k / sqrt(c))^T. Needs ``has_sgemm()``."""
    bs, width, _ = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv_attention_legacy: width {width} is not 3 x {num_heads} heads x c")
    return _QKVAttentionLegacy(num_heads)(qkv)


# ------------------------------------------------------------------------------ convolution


@functools.lru_cache(maxsize=None)
def _dnnl_include_dir() -> str:
    """The include folder of the oneDNN Jittor compiled its oneDNN ops against: ``$mkl_include_path``
    when set, else the copy Jittor unpacks under ``~/.cache/jittor/mkl``."""
    if os.environ.get("mkl_include_path"):
        return os.environ["mkl_include_path"]
    import jittor_utils

    root = Path(jittor_utils.home()) / ".cache" / "jittor" / "mkl"
    for folder in sorted(root.glob("dnnl*")):
        if (folder / "include" / "dnnl.hpp").is_file():
            return str(folder / "include")
    raise FileNotFoundError(f"no oneDNN headers (dnnl*/include/dnnl.hpp) under {root}")


@functools.lru_cache(maxsize=None)
def conv2d_available() -> bool:
    """True when ``conv2d`` can run: Jittor loaded its oneDNN ops and their headers are on disk."""
    if not has_sgemm():
        return False
    try:
        _dnnl_include_dir()
    except FileNotFoundError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _conv_header() -> str:
    return '#include "oneapi/dnnl/dnnl.hpp"\n' + _include(CONV_HEADER)


@functools.lru_cache(maxsize=None)
def _conv_options() -> dict:
    """The convolution op's ``compile_options``: Jittor adds a ``FLAGS:`` key's text to the
    compiler's command line (here the oneDNN include folder, which Jittor's ``jt.code`` ops do
    not otherwise get; its own oneDNN ops are compiled with it)."""
    return {f"FLAGS: -I{_dnnl_include_dir()} ": 1}


def _conv_source(with_bias: bool) -> str:
    bias = "in2_p" if with_bias else "nullptr"
    return (f'iidm::conv2d_forward(in0_p, in1_p, {bias}, out0_p, in0_shape0, in0_shape1, in0_shape2, '
            'in0_shape3, in1_shape0, in1_shape2, in1_shape3, out0_shape2, out0_shape3, '
            '(long)data["stride_h"], (long)data["stride_w"], (long)data["pad_h"], (long)data["pad_w"], '
            '(long)data["dilation_h"], (long)data["dilation_w"], (long)data["groups"]);')


_CONV_SOURCES = {True: _conv_source(True), False: _conv_source(False)}


def _conv2d_forward(x, weight, bias, geometry: dict) -> jt.Var:
    n, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = geometry["stride"], geometry["padding"], geometry["dilation"]
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    data = _conv_data(sh, sw, ph, pw, dh, dw, geometry["groups"])
    inputs = [x, weight] if bias is None else [x, weight, bias]
    y = jt.code((n, out_channels, out_h, out_w), "float32", inputs, cpu_header=_conv_header(),
                cpu_src=_CONV_SOURCES[bias is not None], data=data)
    y.compile_options = _conv_options()
    return y


@functools.lru_cache(maxsize=256)
def _conv_data(sh: int, sw: int, ph: int, pw: int, dh: int, dw: int, groups: int) -> dict:
    return {"stride_h": sh, "stride_w": sw, "pad_h": ph, "pad_w": pw, "dilation_h": dh,
            "dilation_w": dw, "groups": groups}


class _Conv2d(jt.Function):
    """Forward: the cached oneDNN convolution of ``cpu_conv.h``. Backward: Jittor's own oneDNN
    convolution-backward ops (the ones ``jt.nn.conv2d``'s gradient runs on the CPU) and a sum
    over N, H, W for the bias."""

    def __init__(self, geometry: dict):
        self.geometry = geometry

    def execute(self, x, weight, bias):
        self.saved = (x, weight, bias is not None)
        return _conv2d_forward(x, weight, bias, self.geometry)

    def grad(self, grad_y):
        from jittor import compile_extern

        x, weight, with_bias = self.saved
        ops = compile_extern.mkl_ops
        g = self.geometry
        (sh, sw), (ph, pw), (dh, dw) = g["stride"], g["padding"], g["dilation"]
        dx = ops.mkl_conv_backward_x(weight, grad_y, x.shape[2], x.shape[3], sh, sw, ph, pw, dh, dw,
                                     g["groups"])
        dweight = ops.mkl_conv_backward_w(x, grad_y, weight.shape[2], weight.shape[3], sh, sw, ph, pw,
                                          dh, dw, g["groups"])
        return dx, dweight, grad_y.sum([0, 2, 3]) if with_bias else None


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def conv2d(x: jt.Var, weight: jt.Var, bias: jt.Var | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> jt.Var:
    """2-D convolution of x [N, C, H, W] with weight [O, C / groups, KH, KW] and bias [O]
    (float32), as ``jt.nn.conv2d`` / PyTorch's ``conv2d``: zero padding on both sides of each
    spatial axis, output size (H + 2 pad - dilation (KH - 1) - 1) // stride + 1. Needs
    ``conv2d_available()`` (Jittor's oneDNN ops and headers)."""
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"conv2d: x and weight must be 4-D, got {list(x.shape)} and {list(weight.shape)}")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"conv2d: x {list(x.shape)} and weight {list(weight.shape)} do not match "
                         f"for {groups} group(s)")
    if bias is not None and bias.shape != [weight.shape[0]]:
        raise ValueError(f"conv2d: bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    geometry = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation),
                "groups": int(groups)}
    if jt.flags.no_grad:
        return _conv2d_forward(x, weight, bias, geometry)
    return _Conv2d(geometry)(x, weight, bias)
