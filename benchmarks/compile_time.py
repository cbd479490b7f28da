"""What a train step's jit compile costs, and what each compiler setting saves and costs.

    python benchmarks/compile_time.py --models pvt_v2_b2 --variants default+cache,autotune0,cublas
    python benchmarks/compile_time.py --variants rewrites,native --batch 128 --models pvt_v2_b0

Each variant runs in a process of its own (XLA reads XLA_FLAGS once, when its backend starts):
it builds the model's bfloat16 train step (effvit.benchmark_utils.EffvitRunner, as
compare_timm times it), prints the seconds jit lower + compile took, then times the step
(median of `--reps` runs of `--steps` calls after 3 warm-up calls). A variant is one or more
names of VARIANTS joined by "+": `autotune0` (XLA:GPU tries no alternative kernels for its
matmuls and convs), `cublas` (no Triton GEMMs: cuBLAS's), `native` and `rewrites`
(effvit.layers.native_convs forced on or off; on by default on a GPU) and `cache`, which runs
the variant twice over a fresh jax persistent compilation cache (what train.py and eval.py
enable) and reports the second, cached, compile as well. The `autotune0` and `cublas` flags
exist only in a jaxlib with XLA:GPU. Results: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# name: environment it adds; XLA_FLAGS of several names are joined
VARIANTS = {"default": {},
            "autotune0": {"XLA_FLAGS": "--xla_gpu_autotune_level=0"},
            "cublas": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"},
            "native": {"EFFVIT_NATIVE_CONVS": "1"},
            "rewrites": {"EFFVIT_NATIVE_CONVS": "0"},
            "cache": {}}
RESULT = "compile_time.py result: "   # the child's line the parent reads


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="pvt_v2_b2", help="comma-separated effvit names")
  p.add_argument("--variants", default="default+cache,autotune0,cublas",
                 help=f"comma-separated; each one or more of {', '.join(VARIANTS)} joined by +")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--steps", type=int, default=10, help="timed calls per repetition")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for variant in args.variants.split(","):
    unknown = [n for n in variant.split("+") if n not in VARIANTS]
    if unknown:
      p.error(f"unknown variant {unknown[0]!r} in {variant!r}: use names of "
              f"{', '.join(VARIANTS)}, joined by +")
  return args


def variant_env(variant: str, base: dict) -> dict:
  """`base` with the variant's settings; XLA_FLAGS are appended to the user's own."""
  env = dict(base)
  for name in variant.split("+"):
    for key, value in VARIANTS[name].items():
      env[key] = f"{env[key]} {value}".strip() if key == "XLA_FLAGS" and env.get(key) else value
  return env


def child(args) -> None:
  """One build and its timing, in this process; prints the RESULT line."""
  from effvit.benchmark_utils import EffvitRunner, interleave, model_for
  r = EffvitRunner(model_for(args.models, {}, args.res, args.dtype), args.batch, args.res,
                   modes=("train",))
  seconds = interleave({"train": r.train}, steps=args.steps, reps=args.reps, warmup=3)["train"]
  print(RESULT + json.dumps({"compile_s": r.compile_seconds["train"],
                             "img_s": args.batch / seconds}), flush=True)


def run_child(argv: list[str], env: dict) -> dict:
  """A child's result, or SystemExit with its last lines when it failed."""
  p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], env=env,
                     capture_output=True, text=True)
  for line in p.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])
  raise SystemExit(f"compile_time.py: the build failed (exit {p.returncode}):\n{tail}")


def measure(args, model: str, variant: str, run=run_child) -> dict:
  """{"compile_s", "img_s"} of one variant, plus "cached_s" for a `cache` variant."""
  argv = ["--models", model, "--batch", str(args.batch), "--res", str(args.res),
          "--dtype", args.dtype, "--reps", str(args.reps), "--steps", str(args.steps)]
  env = variant_env(variant, os.environ)
  if "cache" not in variant.split("+"):
    env["JAX_COMPILATION_CACHE_DIR"] = ""   # a user's cache would hide the compile
    return run(argv, env)
  with tempfile.TemporaryDirectory() as cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    first = run(argv, env)
    first["cached_s"] = run(argv, env)["compile_s"]
  return first


def main(argv=None, run=run_child):
  args = parse_args(argv)
  if args.child:
    return child(args)
  import jax
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.dtype} train step, "
        f"batch {args.batch}, {args.res} px; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  for model in args.models.split(","):
    base = None
    for variant in args.variants.split(","):
      try:
        m = measure(args, model, variant, run)
      except SystemExit as e:   # a flag this jaxlib lacks fails its variant, not the others
        print(f"{model:18s} {variant:18s} {e}", flush=True)
        continue
      base = base or m
      cached = f", cached {m['cached_s']:6.1f} s" if "cached_s" in m else ""
      print(f"{model:18s} {variant:18s} compile {m['compile_s']:6.1f} s "
            f"({m['compile_s'] / base['compile_s']:.2f}x){cached}  "
            f"{m['img_s']:8.1f} img/s ({m['img_s'] / base['img_s']:.2f}x)", flush=True)


if __name__ == "__main__":
  main()
