"""The 3×3 conv filter gradient: effvit's C++ kernel against XLA:CPU's, on ResNeSt's shapes.

    python benchmarks/conv_filter_grads.py               # ~1 min on a 2-core CPU
    python benchmarks/conv_filter_grads.py --batch 32 --reps 11

For each (H = W, C, F) of resnest50d's stem and split-attention convs (one group, stride 1,
padding 1): dK = dL/dK given x (B, H, W, C) and the output gradient g (B, H, W, F), compiled
with effvit's training options, as XLA derives it (jax.vjp of the conv: a convolution whose
window is the whole map, on transposed x and g) and as effvit.cpu_kernels.conv3x3_filter_grads
(nine dense gradients over shifted rows of the padded map). Calls alternate; medians of
--reps. Prints ms, GFLOP/s and the ratio, and whether effvit.layers uses the kernel at that
width (FILTER_GRAD_KERNEL_MIN_WIDTH).
"""
from __future__ import annotations

import argparse
import statistics
import time

SHAPES = ((112, 32, 32), (112, 32, 64), (56, 32, 64), (56, 64, 128), (28, 64, 128),
          (28, 128, 256), (14, 128, 256), (14, 256, 512), (7, 256, 512))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--reps", type=int, default=7)
  args = p.parse_args(argv)
  from effvit.profile import tune_cpu_allocator
  tune_cpu_allocator()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from effvit import cpu_kernels, layers
  from effvit.xla_cpu import compiler_options
  if cpu_kernels.conv3x3_filter_grads(jnp.ones((1, 3, 3, 1)), jnp.ones((1, 3, 3, 1))) is None:
    raise SystemExit("effvit's C++ kernels are not usable here (no compiler, several devices "
                     "or EFFVIT_CPU_KERNELS=0): nothing to compare")
  opts = compiler_options("train")
  rng = np.random.default_rng(0)
  print(f"{'H=W':>4} {'C':>4} {'F':>4} {'GFLOP':>6}  {'XLA ms':>7} {'GFLOP/s':>7}  "
        f"{'kernel ms':>9} {'GFLOP/s':>7}  {'speed-up':>8}  used")
  for hw, c, f in SHAPES:
    x = jnp.asarray(rng.standard_normal((args.batch, hw, hw, c)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((args.batch, hw, hw, f)), jnp.float32)
    k = jnp.zeros((3, 3, c, f), jnp.float32)
    xla = jax.jit(lambda x, g, k=k: jax.vjp(lambda k: layers._conv_same(x, k), k)[1](g)[0],
                  compiler_options=opts).lower(x, g).compile()
    ours = jax.jit(cpu_kernels.conv3x3_filter_grads, compiler_options=opts).lower(x, g).compile()
    np.testing.assert_allclose(ours(x, g), xla(x, g), rtol=1e-4,
                               atol=1e-4 * np.sqrt(args.batch * hw * hw))
    times = {"xla": [], "ours": []}
    for rep in range(args.reps + 1):
      for name, fn in (("xla", xla), ("ours", ours)):
        t = time.perf_counter()
        fn(x, g).block_until_ready()
        if rep:   # the first round warms up
          times[name].append(time.perf_counter() - t)
    gflop = 2 * args.batch * hw * hw * c * f * 9 / 1e9
    a, b = (statistics.median(times[n]) for n in ("xla", "ours"))
    used = "yes" if hw >= layers.FILTER_GRAD_KERNEL_MIN_WIDTH else "no"
    print(f"{hw:4} {c:4} {f:4} {gflop:6.2f}  {1e3 * a:7.1f} {gflop / a:7.0f}  {1e3 * b:9.1f} "
          f"{gflop / b:7.0f}  {a / b:7.2f}x  {used}", flush=True)


if __name__ == "__main__":
  main()
