"""cuDNN's fused attention against XLA's on a CUDA GPU, for effvit's shapes and models.

    python benchmarks/gpu_attention.py --models ''        # shapes only, under 3 min on an H100
    python benchmarks/gpu_attention.py --no-kernels --models pvt_v2_b2,twins_svt_small

Kernels: for each (N queries, M keys, heads, head width) of benchmarks/attention_kernel.py in
bfloat16, the forward and forward + gradient of effvit.attention.core.fused_attention with cuDNN
and with EFFVIT_CUDNN_ATTENTION=0 (XLA's implementation, which writes the logits and
probabilities to memory). It checks that the cuDNN build holds cuDNN's fused-attention call
and prints both errors against float32 attention. Models: each model's bfloat16 train step
(effvit.benchmark_utils.EffvitRunner) at `--res` traced with cuDNN and with XLA's attention, the
number of cuDNN calls in it, images/s of both, interleaved (medians), and the ratio. The default
256 px gives spatial reduction 64 keys; at 224 px its 49 keys and Twins' 7x7 windows are odd
counts, which cuDNN refuses (effvit.attention.core.cudnn_supported), so both builds are the
same. On an H100 with jax 0.11.2 each train step took about 2 minutes to compile.
Results: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

from attention_kernel import SHAPES

CUDNN_CALL = "__cudnn$fmha"   # custom-call targets of jax's cuDNN attention (forward, backward)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--models", default="pvt_v2_b2", help="comma-separated; '' for none")
  p.add_argument("--res", type=int, default=256, help="models' resolution")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--steps", type=int, default=10, help="timed calls per repetition")
  p.add_argument("--no-kernels", action="store_true")
  return p.parse_args(argv)


def with_cudnn(on: bool, build):
  """build() with EFFVIT_CUDNN_ATTENTION set for its tracing, then restored."""
  with mock.patch.dict(os.environ, {"EFFVIT_CUDNN_ATTENTION": "1" if on else "0"}):
    return build()


def kernels(args) -> None:
  import jax
  import jax.numpy as jnp
  from effvit.attention import core
  from effvit.benchmark_utils import interleave
  print(f"kernels, bfloat16, batch {args.batch}: ms XLA -> cuDNN (ratio); max |error| against "
        "float32 attention, XLA / cuDNN")
  for name, (mult, n, m, heads, d) in SHAPES.items():
    keys = jax.random.split(jax.random.key(0), 4)
    b = args.batch * mult
    q, g = (jax.random.normal(k, (b, n, heads, d), jnp.bfloat16) for k in keys[:2])
    k, v = (jax.random.normal(k, (b, m, heads, d), jnp.bfloat16) for k in keys[2:])
    exact = core.apply_attention(core.attention_probs(*(a.astype(jnp.float32) for a in (q, k))),
                                 v.astype(jnp.float32))
    loss = lambda q, k, v: (core.fused_attention(q, k, v).astype(jnp.float32) * g).sum()
    runners, errors, calls = {}, {}, {}
    for tag, on in (("xla", False), ("cudnn", True)):
      fwd = with_cudnn(on, lambda: jax.jit(core.fused_attention).lower(q, k, v).compile())
      grad = with_cudnn(on, lambda: jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile())
      calls[tag] = fwd.as_text().count(CUDNN_CALL) + grad.as_text().count(CUDNN_CALL)
      errors[tag] = float(jnp.abs(fwd(q, k, v).astype(jnp.float32) - exact).max())
      runners[f"{tag} fwd"] = lambda f=fwd: f(q, k, v).block_until_ready()
      runners[f"{tag} grad"] = lambda f=grad: jax.block_until_ready(f(q, k, v))
    if calls["xla"] or not calls["cudnn"]:
      print(f"  {name}: cuDNN calls {calls['cudnn']} with cuDNN, {calls['xla']} without")
    t = interleave(runners, steps=args.steps, reps=args.reps, warmup=2)
    cell = lambda mode: (f"{t['xla ' + mode] * 1e3:6.2f} -> {t['cudnn ' + mode] * 1e3:6.2f} ms "
                         f"({t['xla ' + mode] / t['cudnn ' + mode]:.2f}x)")
    print(f"{name:32s} (B={b}, N={n}, M={m}, {heads}x{d})  forward {cell('fwd')}  "
          f"forward + gradient {cell('grad')}  error {errors['xla']:.3f} / "
          f"{errors['cudnn']:.3f}", flush=True)


def models(args) -> None:
  from effvit.benchmark_utils import EffvitRunner, interleave, model_for
  print(f"\nmodels, bfloat16 train step, batch {args.batch}, {args.res} px: img/s XLA -> cuDNN")
  for name in args.models.split(","):
    runners, calls = {}, {}
    for tag, on in (("xla", False), ("cudnn", True)):
      r = with_cudnn(on, lambda: EffvitRunner(model_for(name, {}, args.res, "bfloat16"),
                                              args.batch, args.res))
      calls[tag] = r.compiled["train"].as_text().count(CUDNN_CALL)
      runners[tag] = r.train
      r.train()
    t = interleave(runners, steps=args.steps, reps=args.reps, warmup=2)
    ips = {k: args.batch / s for k, s in t.items()}
    print(f"{name:20s} {ips['xla']:8.1f} -> {ips['cudnn']:8.1f} img/s "
          f"({ips['cudnn'] / ips['xla']:.2f}x); cuDNN calls in the step: {calls['cudnn']} "
          f"(XLA build: {calls['xla']})", flush=True)


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  device = jax.devices()[0]
  if device.platform != "gpu" or not hasattr(device, "compute_capability"):
    sys.exit(f"benchmarks/gpu_attention.py needs a CUDA GPU; JAX's device is {device}")
  print(f"jax {jax.__version__} on {device.device_kind} (compute capability "
        f"{device.compute_capability})", flush=True)
  if not args.no_kernels:
    kernels(args)
  if args.models:
    models(args)


if __name__ == "__main__":
  main()
