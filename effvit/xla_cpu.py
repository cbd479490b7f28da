"""XLA:CPU compiler options for effvit's compiled steps, one set per kind of step.

jax 0.10's XLA:CPU hands dots, reductions and elementwise ops to YNNPACK fusions. Which of
them pay off depends on the step (2-core AVX-512 machine, float32, 224 px; benchmarks/README.md):

- inference: only individual dots go to YNNPACK; XLA's own emitters run the LayerNorm and
  softmax reductions and the elementwise work around them. pvt_v2_b0 at batch 32 went from
  73 to 122 img/s, pvt_v2_b2 from 20.6 to 26.4, resnest50d (batch 8) from 18.5 to 22.4.
- training: dots and reductions go to YNNPACK, elementwise work to XLA. The weight-gradient
  reductions (over batch and space) need YNNPACK: with XLA's emitter for them pvt_v2_b2's
  step was 4x slower. YNNPACK's elementwise fusions are what costs: without them pvt_v2_b0's
  step went from 18.6 to 21.6 img/s, pvt_v2_b2's from 5.0 to 5.4.

- bfloat16 training: individual dots and reductions go to YNNPACK. Under DOT, YNNPACK's
  bfloat16 dots ran at a quarter of their speed (a 4096² dot: 66 against 285-332 GFLOP/s);
  individual dots had sent the weight-gradient dots to XLA's float32 fallback, which the
  dense-gradient kernel (effvit/cpu_kernels/dense_grads.cc) now replaces. Batch 8, with that
  kernel: pvt_v2_b0's step 355 → 343 ms, pvt_v2_b2's 1812 → 1549 ms (DOT alone, without it:
  386 and 1934). float32 training measured even both ways and keeps DOT.

- init: the state's initialisation runs once and is random-number generation only (XLA drops
  the forward pass), so LLVM's optimisation is not worth its compile time: pvt_v2_b2's init
  compiled in 7.0 s instead of 11.9 and ran in 0.9 s instead of 0.2. Values differ from the
  optimised build by at most an ulp.

- remat (train steps): XLA:CPU strips jax.checkpoint's optimization barriers before common
  subexpression elimination, which then merges the backward's recomputation with the forward,
  so `model.remat` saved no memory: pvt_v2_b0's 448-px train step planned the same 1127 MiB
  of temporaries with and without it. Keeping the barriers (skipping XLA's
  cse_barrier_expander pass; a step without remat has none) makes remat recompute.

Options apply to the CPU backend only. EFFVIT_XLA_CPU=default, or a YNN fusion setting of your
own in XLA_FLAGS, keeps XLA's defaults.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_YNN_FUSIONS = {
    "inference": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "train": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "train_bfloat16": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
_INIT = {"xla_backend_optimization_level": 0}
_DISABLE = "xla_disable_hlo_passes"
_KEEP_REMAT = {_DISABLE: "cse_barrier_expander"}


def compiler_options(kind: str, dtype=None) -> dict:
  """Options for `jax.jit(..., compiler_options=...)` of an "inference" or "train" step, or
  of the train state's "init"; `dtype` is the model's compute dtype (bfloat16 training has
  its own set)."""
  if kind not in ("inference", "train", "init"):
    raise ValueError(f"kind must be one of ['inference', 'init', 'train'], got {kind!r}")
  if jax.default_backend() != "cpu":
    return {}
  xla_flags = os.environ.get("XLA_FLAGS", "")
  # remat is a feature, not a tuning: it works under EFFVIT_XLA_CPU=default too
  options = dict(_KEEP_REMAT) if kind == "train" and _DISABLE not in xla_flags else {}
  if os.environ.get("EFFVIT_XLA_CPU") == "default":
    return options
  if kind == "init":
    return dict(_INIT)
  if kind == "train" and dtype is not None and jnp.dtype(dtype) == jnp.bfloat16:
    kind = "train_bfloat16"
  if _YNN_FLAG not in xla_flags:
    options[_YNN_FLAG] = _YNN_FUSIONS[kind]
  return options
