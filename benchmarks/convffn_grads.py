"""The ConvFFN in training: effvit's one-pass C++ gradient against the three ops.

    python benchmarks/convffn_grads.py                # ~2 min on a 2-core CPU

For PVTv2's ConvFFN shapes (batch, map width, C, hidden D), forward + gradient of one ConvFFN
as the three ops with their kernels (effvit.layers._convffn_layers and jax.vjp) and as the
fused forward plus cpu_kernels.convffn_grads, compiled with effvit's training options. Calls
alternate; best of --reps medians of 5. Prints ms, the ratio, and whether effvit.layers uses
the kernel for the shape (CONVFFN_GRAD_KERNEL_MAX_WEIGHTS).
"""
from __future__ import annotations

import argparse

# name: (batch, map width, C, D); F = C
SHAPES = {"pvt_v2_b0 56 px": (32, 56, 32, 256), "pvt_v2_b0 28 px": (32, 28, 64, 512),
          "pvt_v2_b0 14 px": (32, 14, 160, 640), "pvt_v2_b2 56 px": (8, 56, 64, 512),
          "pvt_v2_b2 28 px": (8, 28, 128, 1024), "pvt_v2_b2 14 px": (8, 14, 320, 1280)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names")
  args = p.parse_args(argv)
  from effvit.profile import tune_cpu_allocator
  tune_cpu_allocator()
  import jax
  import numpy as np
  from effvit import cpu_kernels, layers
  from effvit.benchmark_utils import interleave
  from effvit.xla_cpu import compiler_options

  def three_ops(a, g):
    return jax.vjp(layers._convffn_layers, *a)[1](g)

  def kernels(a, g):
    return (cpu_kernels.convffn(*a),) + cpu_kernels.convffn_grads(*a[:6], g)

  options = compiler_options("train")
  for name in args.shapes.split(","):
    b, w, c, d = SHAPES[name]
    rng = np.random.default_rng(0)
    normal = lambda *s: np.asarray(rng.standard_normal(s) * 0.1, np.float32)
    a = (normal(b, w, w, c), normal(c, d), normal(d), normal(3, 3, d), normal(d), normal(d, c),
         normal(c))
    g = normal(b, w, w, c)
    if kernels(a, g)[1] is None:
      raise SystemExit("the C++ kernels do not run here (no compiler, or several devices)")
    fa, fb = (jax.jit(f, compiler_options=options) for f in (three_ops, kernels))
    runners = {"three ops": lambda: jax.block_until_ready(fa(a, g)),
               "kernels": lambda: jax.block_until_ready(fb(a, g))}
    medians = [interleave(runners, steps=1, reps=5, warmup=1) for _ in range(args.reps)]
    ta, tb = (1e3 * min(m[k] for m in medians) for k in runners)
    used = 2 * c * d <= layers.CONVFFN_GRAD_KERNEL_MAX_WEIGHTS
    print(f"{name:18s} (B {b}, C {c}, D {d}): three ops {ta:6.1f} ms, kernels "
          f"{tb:6.1f} ms ({ta / tb:.2f}x){'  used' if used else ''}", flush=True)


if __name__ == "__main__":
  main()
