"""cuDNN's fused attention against XLA's on a CUDA GPU, for effvit's shapes and models; and
models with native convs against XLA:CPU's rewrites of them.

    python benchmarks/gpu_attention.py --models ''        # shapes only, under 3 min on an H100
    python benchmarks/gpu_attention.py --no-kernels --models pvt_v2_b2,twins_svt_small
    python benchmarks/gpu_attention.py --no-kernels --switch convs --res 224 --batch 128 \
        --models pvt_v2_b2,resnest50d

Kernels: for each (N queries, M keys, heads, head width) of benchmarks/attention_kernel.py in
bfloat16, the forward and forward + gradient of effvit.attention.core.fused_attention with cuDNN
and with EFFVIT_CUDNN_ATTENTION=0 (XLA's implementation, which writes the logits and
probabilities to memory). It checks that the cuDNN build holds cuDNN's fused-attention call
and prints both errors against float32 attention. Models: each model's bfloat16 train step
(effvit.benchmark_utils.EffvitRunner) at `--res` traced both ways of `--switch`: `attention`
(default) with cuDNN's attention and XLA's, `convs` with effvit.layers.native_convs on and off
(EFFVIT_NATIVE_CONVS: grouped and strided convs as XLA's own, cuDNN's on a GPU, or as the
depthwise shifted adds, split groups and patch matmuls that XLA:CPU needs). It prints each
build's compile seconds and cuDNN calls, images/s of both, interleaved (medians), and the
ratio. The default 256 px gives spatial reduction 64 keys; at 224 px its 49 keys and Twins'
7x7 windows are odd counts, which cuDNN refuses (effvit.attention.core.cudnn_supported), so
both attention builds are the same. On an H100 with jax 0.11.2 each train step took about 2
minutes to compile. Results: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

from attention_kernel import SHAPES

CUDNN_CALL = "__cudnn$fmha"   # custom-call targets of jax's cuDNN attention (forward, backward)
CUDNN_CONV = "__cudnn$conv"   # XLA:GPU's convolution custom calls

# --switch: (environment variable, label with it "0", label with it "1", custom call counted)
SWITCHES = {"attention": ("EFFVIT_CUDNN_ATTENTION", "XLA", "cuDNN", CUDNN_CALL),
            "convs": ("EFFVIT_NATIVE_CONVS", "rewrites", "native", CUDNN_CONV)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--models", default="pvt_v2_b2", help="comma-separated; '' for none")
  p.add_argument("--res", type=int, default=256, help="models' resolution")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--steps", type=int, default=10, help="timed calls per repetition")
  p.add_argument("--no-kernels", action="store_true")
  p.add_argument("--switch", default="attention", choices=sorted(SWITCHES),
                 help="what the models part turns off and on")
  return p.parse_args(argv)


def with_switch(on: bool, build, switch: str = "attention"):
  """build() with the switch's environment variable set for its tracing, then restored."""
  with mock.patch.dict(os.environ, {SWITCHES[switch][0]: "1" if on else "0"}):
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
      fwd = with_switch(on, lambda: jax.jit(core.fused_attention).lower(q, k, v).compile())
      grad = with_switch(on, lambda: jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile())
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
  _, off, on, call = SWITCHES[args.switch]
  print(f"\nmodels, bfloat16 train step, batch {args.batch}, {args.res} px: img/s {off} -> {on}")
  for name in args.models.split(","):
    runners, calls, seconds = {}, {}, {}
    for tag, state in ((off, False), (on, True)):
      r = with_switch(state, lambda: EffvitRunner(model_for(name, {}, args.res, "bfloat16"),
                                                  args.batch, args.res, modes=("train",)),
                      args.switch)
      calls[tag] = r.compiled["train"].as_text().count(call)
      seconds[tag] = r.compile_seconds["train"]
      runners[tag] = r.train
      r.train()
      print(f"  {name} {tag}: compiled in {seconds[tag]:.0f} s, {calls[tag]} {call} calls",
            flush=True)
    t = interleave(runners, steps=args.steps, reps=args.reps, warmup=2)
    ips = {k: args.batch / s for k, s in t.items()}
    print(f"{name:20s} {ips[off]:8.1f} -> {ips[on]:8.1f} img/s ({ips[on] / ips[off]:.2f}x); "
          f"compile {seconds[off]:.0f} -> {seconds[on]:.0f} s", flush=True)


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
