"""C++ kernels for XLA:CPU, compiled on first use and called through the XLA FFI.

depthwise_conv3x3.cc: the 3×3 depthwise conv of PVTv2's ConvFFN (and LaViT's):
- its gradient, whose weight part XLA:CPU runs as nine full passes over the activation and its
  gradient, in one pass (used by DepthwiseConv without GELU, Twins' PEG; when the ConvFFN used
  it, pvt_v2_b0's training step at batch 32 went 976 → 835 ms on the project's 2-core machine;
  benchmarks/README.md);
- its forward fused with the bias and GELU that follow it, one pass where XLA pads first,
  used for inference (effvit.layers.depthwise_conv_gelu; pvt_v2_b0 at batch 32: 219 → 205 ms),
  and with the bias of the fc1 before it (effvit.layers.biased_conv_gelu: 368 → 345 ms);
- that fused op's gradient in one pass, recomputing the conv in cache where XLA recomputes it,
  writes gy·gelu'(h) and reduces it in passes of their own (pvt_v2_b0's training step at batch
  32: 1019 → 841 ms; pvt_v2_b2 at batch 8: 1078 → 970 ms).
layer_norm.cc: LayerNorm over the last axis and its gradient, one pass over the rows each
(effvit.layers.LayerNorm; fwd + bwd 2-3x faster than XLA's, pvt_v2_b2's training step at
batch 8 1944 → 1792 ms).
batch_norm.cc: BatchNorm in training and its gradient, two passes each (effvit.layers.BatchNorm;
ResNeSt).
dense_grads.cc: the parameter gradient of a dense layer (x^T g and sum(g) over the P rows),
which Eigen ran on one thread where C x F is small (effvit.layers.linear, float32 and
bfloat16; 1.3-3.5x faster than XLA's, as fast as PyTorch's; pvt_v2_b2's float32 training step
at batch 8 1621 → 1547 ms); and, as nine of those over shifted maps, the filter gradient of
a 3×3 conv with stride 1 (effvit.layers.conv3x3, used by ResNeSt's stem and split attention on
maps at least 56 wide: 1.4-1.9x faster than XLA's there, alone; resnest50d's training step
0-4% faster).
convffn.cc: the whole ConvFFN for inference (fc1, the conv + GELU and fc2) one group of an
image's rows at a time, its hidden maps kept in cache (effvit.layers.fused_convffn; maps at
least 14 wide; pvt_v2_b0's forward at batch 32 461 -> 383 ms, pvt_v2_b2's at batch 8
502 -> 461 ms); and the plain transformer MLP (fc1, GELU, fc2) of PVTv1 and Twins for inference,
a block of rows at a time (effvit.layers.fused_mlp; twins_pcpvt_small's forward at batch 32
2166 -> 1906 ms).
convffn_grads.cc: the ConvFFN's gradient for training in one pass, recomputing h and z from x a
group of rows at a time in cache, so that the training forward is convffn.cc's and keeps
nothing but x (effvit.layers.fused_convffn with train=True, while dW1 and dW2 fit in L2:
pvt_v2_b0's training step at batch 32 1078 -> 979 ms, at batch 8 277 -> 243 ms; pvt_v2_b2's
at batch 8 1505 -> 1445 ms, only its first stage qualifying).
attention.cc: softmax attention over few keys (spatial reduction's 49, Twins' 7x7 windows)
and its gradient, one pass each with the logits and probabilities in cache where XLA makes a
dozen passes over them (effvit.attention.core.few_keys_attention; training steps 7-14% faster:
pvt_v2_b0 at batch 32 1147 -> 1042 ms, twins_pcpvt_small at batch 8 1463 -> 1286 ms).
common.h, conv_gelu.h (the conv + GELU at a pixel), matmul_tiles.h (register-tiled matmuls):
what they share.

The source ships with the package and is built with the system C++ compiler ($CXX, else c++)
into $EFFVIT_KERNEL_CACHE (default ~/.cache/effvit), keyed by source, jaxlib version, compiler
and CPU, so a build is reused until one of them changes. Without a compiler, or if the build
fails, effvit warns once and keeps XLA's path: same results, slower. EFFVIT_CPU_KERNELS=0
turns the kernels off. They are used on the CPU backend with a single device: XLA's SPMD
partitioner has no sharding rule for an FFI call and would gather a batch-sharded input onto
every device, so multi-device runs (and the test suite's 8 simulated devices) keep XLA's path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

_DIR = pathlib.Path(__file__).parent
_SOURCES = (_DIR / "depthwise_conv3x3.cc", _DIR / "layer_norm.cc", _DIR / "batch_norm.cc",
            _DIR / "dense_grads.cc", _DIR / "convffn.cc", _DIR / "convffn_grads.cc",
            _DIR / "attention.cc")
_HEADERS = (_DIR / "common.h", _DIR / "conv_gelu.h", _DIR / "matmul_tiles.h")
# FFI target name -> symbol in the library
_TARGETS = {"effvit_depthwise_conv3x3_bwd_f32": "EffvitDepthwiseConv3x3BwdF32",
            "effvit_depthwise_conv3x3_bias_gelu_f32": "EffvitDepthwiseConv3x3BiasGeluF32",
            "effvit_depthwise_conv3x3_bias_gelu_bwd_f32": "EffvitDepthwiseConv3x3BiasGeluBwdF32",
            "effvit_layer_norm_f32": "EffvitLayerNormF32",
            "effvit_layer_norm_bwd_f32": "EffvitLayerNormBwdF32",
            "effvit_batch_norm_f32": "EffvitBatchNormF32",
            "effvit_batch_norm_bwd_f32": "EffvitBatchNormBwdF32",
            "effvit_dense_grads_f32": "EffvitDenseGradsF32",
            "effvit_conv3x3_filter_grads_f32": "EffvitConv3x3FilterGradsF32",
            "effvit_convffn_f32": "EffvitConvFfnF32",
            "effvit_convffn_bwd_f32": "EffvitConvFfnBwdF32",
            "effvit_mlp_f32": "EffvitMlpF32",
            "effvit_attention_f32": "EffvitAttentionF32",
            "effvit_attention_bwd_f32": "EffvitAttentionBwdF32"}
# -march=native: the build is per machine (the cache key includes the CPU's flags).
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def enabled() -> bool:
  return os.environ.get("EFFVIT_CPU_KERNELS", "1") != "0"


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_id() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()


def library_path(compiler: str) -> pathlib.Path:
  key = hashlib.sha256()
  sources = tuple(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
  for part in (*sources, jax.ffi.include_dir(), importlib.metadata.version("jaxlib"), compiler,
               " ".join(_FLAGS), _cpu_id()):
    key.update(part if isinstance(part, bytes) else part.encode())
  cache = pathlib.Path(os.environ.get("EFFVIT_KERNEL_CACHE",
                                      pathlib.Path.home() / ".cache" / "effvit"))
  return cache / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build(compiler: str, path: pathlib.Path) -> pathlib.Path:
  """Compiles the kernels into `path` unless it exists; the rename makes concurrent builds
  (pytest-xdist workers, several hosts on one home directory) safe."""
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = pathlib.Path(tmp) / path.name
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{_DIR}", *map(str, _SOURCES),
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      raise OSError(f"{compiler} exited with {proc.returncode}: {last}")
    os.replace(out, path)
  return path


@functools.cache
def _registered() -> bool:
  """Builds, loads and registers the kernels once per process; False (with one warning) if
  that fails."""
  compiler = _compiler()
  try:
    if compiler is None:
      raise OSError("no C++ compiler found; install one or set CXX")
    lib = ctypes.cdll.LoadLibrary(str(build(compiler, library_path(compiler))))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
    return True
  except (OSError, AttributeError, subprocess.SubprocessError) as e:
    warnings.warn(f"effvit: CPU kernels unavailable ({e}); depthwise convs, norm layers and "
                  "dense-layer gradients use XLA's slower path (same results). Set "
                  "EFFVIT_CPU_KERNELS=0 to silence this.",
                  stacklevel=2)
    return False


def _single_device() -> bool:
  return jax.device_count() == 1


def usable(*arrays: jax.Array) -> bool:
  """Whether the kernels can run on these arrays (float32 or bfloat16, CPU backend, one device,
  enabled and built)."""
  return (all(a.dtype in (jnp.float32, jnp.bfloat16) for a in arrays)
          and jax.default_backend() == "cpu" and _single_device() and enabled() and _registered())


def applies(x: jax.Array, kernel: jax.Array, *others: jax.Array) -> bool:
  """Whether the depthwise kernels run for these arrays (NHWC x, a 3×3 kernel, and usable)."""
  return kernel.shape[:2] == (3, 3) and x.ndim == 4 and usable(x, kernel, *others)


def _call(target: str, like: tuple[jax.Array, ...], *args: jax.Array, **attrs):
  """The float32 FFI target on float32 copies of args; its outputs, shaped and typed as `like`.

  bfloat16 arrays are widened on the way in and rounded on the way out: the kernels compute
  in float32 either way, and XLA:CPU's bfloat16 path for the same conv (element-wise widening
  around every tap and reduction) made pvt_v2_b0's bfloat16 training step slower than its
  float32 one.
  """
  out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in like)
  ys = jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      *(a.astype(jnp.float32) for a in args), **attrs)
  return tuple(y.astype(a.dtype) for y, a in zip(ys, like))


def depthwise_conv3x3_grads(x: jax.Array, kernel: jax.Array, g: jax.Array):
  """(dx, dk) of a "same" 3×3 depthwise conv of NHWC `x` with a (3, 3, C) kernel given the
  output gradient g, or None where the kernel does not apply (not float32/bfloat16, not 3×3,
  not the CPU backend, several devices, disabled or unavailable)."""
  if not applies(x, kernel, g):
    return None
  return _call("effvit_depthwise_conv3x3_bwd_f32", (x, kernel), x, kernel, g)


def depthwise_conv3x3_bias_gelu(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                                in_bias: jax.Array | None = None):
  """gelu(depthwise_conv(x + in_bias, kernel) + bias) (exact GELU; zero padding, in_bias only
  inside the map) in x's dtype, or None where the kernel does not apply (as for
  depthwise_conv3x3_grads)."""
  in_bias = jnp.zeros_like(bias) if in_bias is None else in_bias
  if not applies(x, kernel, bias, in_bias):
    return None
  return _call("effvit_depthwise_conv3x3_bias_gelu_f32", (x,), x, kernel, bias, in_bias)[0]


def depthwise_conv3x3_bias_gelu_grads(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                                      g: jax.Array):
  """(dx, dk, db) of depthwise_conv3x3_bias_gelu given its output gradient g, or None where
  the kernel does not apply."""
  if not applies(x, kernel, bias, g):
    return None
  return _call("effvit_depthwise_conv3x3_bias_gelu_bwd_f32", (x, kernel, bias), x, kernel,
               bias, g)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
  """(y, mean, rstd) of a LayerNorm over the last axis of 2-D `x` ((N, C); y float32, mean and
  rstd (N,)), or None where the kernels are not usable."""
  if x.ndim != 2 or not usable(x, scale, bias):
    return None
  stats = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
  return _call("effvit_layer_norm_f32", (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats,
                                         stats), x, scale, bias, eps=np.float32(eps))


def layer_norm_grads(x: jax.Array, scale: jax.Array, mean: jax.Array, rstd: jax.Array,
                     g: jax.Array):
  """(dx, dscale, dbias) of `layer_norm` given its output gradient g, in the dtypes of x,
  scale and scale, or None where the kernels are not usable."""
  if not usable(x, scale, g):
    return None
  return _call("effvit_layer_norm_bwd_f32", (x, scale, scale), x, scale, mean, rstd, g)


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
  """(y, mean, var) of BatchNorm in training over the rows of 2-D `x` ((R, C), float32; var
  biased), or None where the kernels are not usable."""
  if x.ndim != 2 or not usable(x, scale, bias):
    return None
  stats = jax.ShapeDtypeStruct(x.shape[1:], jnp.float32)
  return _call("effvit_batch_norm_f32", (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats,
                                         stats), x, scale, bias, eps=np.float32(eps))


def batch_norm_grads(x: jax.Array, scale: jax.Array, mean: jax.Array, var: jax.Array,
                     gy: jax.Array, gmean: jax.Array, gvar: jax.Array, eps: float):
  """(dx, dscale, dbias) of `batch_norm` given the cotangents of y, mean and var, or None where
  the kernels are not usable."""
  if not usable(x, scale, gy):
    return None
  return _call("effvit_batch_norm_bwd_f32", (x, scale, scale), x, scale, mean, var, gy, gmean,
               gvar, eps=np.float32(eps))


def dense_grads(x: jax.Array, g: jax.Array):
  """(dW, db) of a dense layer over the rows of 2-D `x` ((P, C)) given its output gradient g
  ((P, F)), in float32 whatever x's and g's dtypes (bfloat16 activations have float32
  parameters), or None where the kernels are not usable."""
  if x.ndim != 2 or g.ndim != 2 or not usable(x, g):
    return None
  return _call("effvit_dense_grads_f32",
               (jax.ShapeDtypeStruct((x.shape[1], g.shape[1]), jnp.float32),
                jax.ShapeDtypeStruct(g.shape[1:], jnp.float32)), x, g)


def conv3x3_filter_grads(x: jax.Array, g: jax.Array):
  """The (3, 3, C, F) kernel gradient, in float32, of a 3×3 conv with stride 1 and zero
  padding 1 of NHWC `x` ((B, H, W, C)) given its output gradient g ((B, H, W, F)), or None
  where the kernels are not usable."""
  if x.ndim != 4 or g.shape != x.shape[:3] + g.shape[3:] or not usable(x, g):
    return None
  xpad = jnp.pad(x, ((0, 0), (1, 2), (1, 1), (0, 0)))
  gpad = jnp.pad(g, ((0, 0), (0, 0), (0, 2), (0, 0)))
  return _call("effvit_conv3x3_filter_grads_f32",
               (jax.ShapeDtypeStruct((3, 3, x.shape[3], g.shape[3]), jnp.float32),), xpad,
               gpad)[0]


def float32_usable(*arrays: jax.Array) -> bool:
  """Whether the float32-only kernels (`convffn`, `mlp`) can run on these arrays."""
  return all(a.dtype == jnp.float32 for a in arrays) and usable(*arrays)


def convffn(x: jax.Array, w1: jax.Array, b1: jax.Array, kernel: jax.Array, bias: jax.Array,
            w2: jax.Array, b2: jax.Array):
  """PVTv2's ConvFFN, gelu(depthwise_conv3x3(x W1 + b1, kernel) + bias) W2 + b2, of NHWC float32
  `x` ((B, H, W, C); W1 (C, D), kernel (3, 3, D), W2 (D, F)) in one pass (convffn.cc), or None
  where x is not 4-D or float32_usable does not hold. No gradient: see
  effvit.layers.fused_convffn."""
  args = (x, w1, b1, kernel, bias, w2, b2)
  if x.ndim != 4 or not float32_usable(*args):
    return None
  out = jax.ShapeDtypeStruct(x.shape[:3] + w2.shape[1:], jnp.float32)
  return jax.ffi.ffi_call("effvit_convffn_f32", out, vmap_method="sequential")(*args)


def convffn_grads(x: jax.Array, w1: jax.Array, b1: jax.Array, kernel: jax.Array,
                  bias: jax.Array, w2: jax.Array, g: jax.Array):
  """(dx, dW1, db1, dkernel, dbias, dW2, db2) of `convffn` given g = dL/dy, recomputing its
  hidden maps from x in one pass (convffn_grads.cc); None where `convffn` would not run."""
  args = (x, w1, w1.T, b1, kernel, bias, w2.T, g)
  if x.ndim != 4 or g.ndim != 4 or not float32_usable(*args):
    return None
  out = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in
              (x.shape, w1.shape, b1.shape, kernel.shape, bias.shape, w2.shape, w2.shape[1:]))
  return jax.ffi.ffi_call("effvit_convffn_bwd_f32", out, vmap_method="sequential")(*args)


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array):
  """The transformer MLP gelu(x W1 + b1) W2 + b2 (exact GELU) of float32 rows `x` ((P, C))
  in one pass (convffn.cc), or None where x is not 2-D or float32_usable does not hold. No
  gradient: see effvit.layers.fused_mlp."""
  args = (x, w1, b1, w2, b2)
  if x.ndim != 2 or not float32_usable(*args):
    return None
  out = jax.ShapeDtypeStruct((x.shape[0], w2.shape[1]), jnp.float32)
  return jax.ffi.ffi_call("effvit_mlp_f32", out, vmap_method="sequential")(*args)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
  """(o, lse): o = softmax(scale q kᵀ) v per batch element and head of float32 q (B, N, H, d)
  and k, v (B, M, H, d), and lse (B, N, H), the log-sum-exp of each query's logits, which the
  gradient needs (attention.cc); None where q is not 4-D or float32_usable does not hold.
  No gradient: see effvit.attention.core."""
  if q.ndim != 4 or not float32_usable(q, k, v):
    return None
  out = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in (q.shape, q.shape[:3]))
  return jax.ffi.ffi_call("effvit_attention_f32", out, vmap_method="sequential")(
      q, k, v, scale=np.float32(scale))


def attention_grads(q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array,
                    g: jax.Array, scale: float):
  """(dq, dk, dv) of `attention` given g = dL/do, from its outputs o and lse."""
  out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
  return jax.ffi.ffi_call("effvit_attention_bwd_f32", out, vmap_method="sequential")(
      q, k, v, o, lse, g, scale=np.float32(scale))
