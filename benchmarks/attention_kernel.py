"""Attention over few keys: effvit's C++ kernel against XLA:CPU's keys-major ops.

    python benchmarks/attention_kernel.py                # ~2 min on a 2-core CPU
    python benchmarks/attention_kernel.py --batch 8 --reps 9

For each (N queries, M keys, heads, head width) of the attention layers the kernel serves
(pvt_v2_b0's and pvt_v2_b2's spatial-reduction attention, Twins-SVT's 7x7 windows as a batch
of windows, and larger key counts up to effvit.attention.core.FUSED_MAX_KEYS), the forward and
forward + gradient (jax.grad of <attention(q, k, v), g>) as effvit.attention.core's
keys_major_attention (XLA) and few_keys_attention (effvit/cpu_kernels/attention.cc), compiled
with effvit's training options. Calls alternate; medians of --reps. Prints ms and the ratio.
"""
from __future__ import annotations

import argparse

# name: (batch multiplier, N, M, heads, head width); the batch is --batch times the multiplier
SHAPES = {"pvt_v2_b0 stage 1": (1, 3136, 49, 1, 32), "pvt_v2_b0 stage 2": (1, 784, 49, 2, 32),
          "pvt_v2_b0 stage 3": (1, 196, 49, 5, 32), "pvt_v2_b0 stage 4": (1, 49, 49, 8, 32),
          "pvt_v2_b2 stage 1": (1, 3136, 49, 1, 64),
          "twins_svt_small stage 1 windows": (64, 49, 49, 2, 32),
          "64 keys (256 px)": (1, 4096, 64, 1, 32), "144 keys (384 px)": (1, 9216, 144, 1, 32),
          "256 keys": (1, 1024, 256, 2, 32)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args(argv)
  from effvit.profile import tune_cpu_allocator
  tune_cpu_allocator()
  import jax
  from effvit.attention import core
  from effvit.benchmark_utils import interleave
  from effvit.xla_cpu import compiler_options
  ones = jax.numpy.ones((1, 2, 1, 16))
  if core.few_keys_attention(ones, ones, ones) is None:
    raise SystemExit("effvit's C++ kernels are not usable here (no compiler, several devices "
                     "or EFFVIT_CPU_KERNELS=0): nothing to compare")
  opts = compiler_options("train")
  print(f"batch {args.batch}, medians of {args.reps}; ms XLA -> kernel (ratio)")
  for name, (mult, n, m, heads, d) in SHAPES.items():
    keys = jax.random.split(jax.random.key(0), 4)
    b = args.batch * mult
    q, g = (jax.random.normal(k, (b, n, heads, d)) for k in keys[:2])
    k, v = (jax.random.normal(k, (b, m, heads, d)) for k in keys[2:])
    runners = {}
    for tag, attend in (("xla", core.keys_major_attention), ("kernel", core.few_keys_attention)):
      fwd = jax.jit(lambda q, k, v, f=attend: f(q, k, v), compiler_options=opts)
      loss = lambda q, k, v, f=attend: (f(q, k, v) * g).sum()
      grad = jax.jit(jax.grad(loss, (0, 1, 2)), compiler_options=opts)
      runners[f"{tag} fwd"] = lambda f=fwd: f(q, k, v).block_until_ready()
      runners[f"{tag} grad"] = lambda f=grad: jax.block_until_ready(f(q, k, v))
    t = interleave(runners, steps=3, reps=args.reps, warmup=2)
    cell = lambda mode: (f"{t['xla ' + mode] * 1e3:7.1f} -> {t['kernel ' + mode] * 1e3:6.1f} ms "
                         f"({t['xla ' + mode] / t['kernel ' + mode]:.2f}x)")
    print(f"{name:32s} (B={b}, N={n}, M={m}, {heads}x{d})  forward {cell('fwd')}  "
          f"forward + gradient {cell('grad')}", flush=True)


if __name__ == "__main__":
  main()
