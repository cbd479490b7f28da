"""effvit against timm on one machine, in one run: images/s for inference and a training step.

    python benchmarks/compare_timm.py                     # all models, batch 8 and 32, 224 px
    python benchmarks/compare_timm.py --models pvt_v2_b2 --batch 32 --markdown

For every model and batch it measures, interleaved in one process (effvit, timm eager, timm
compiled, effvit, ...; `--reps` rounds of `--steps` calls each, medians reported):
  inference  effvit `jax.jit(model.apply)` / timm `model(x)` under `torch.inference_mode()`
  train      effvit's own jitted train step (effvit.train.state.train_step: forward, backward,
             AdamW, donated state) / timm `loss.backward(); optimizer.step()` with AdamW
effvit compiles each with effvit.xla_cpu's options for that kind of step, as train.py and
eval.py do (EFFVIT_XLA_CPU=default measures XLA's defaults instead).
both in `--dtype` (float32 by default; `bfloat16` is meant for GPUs), on random weights and
images. `torch.compile` (inductor, needs a C++ compiler) is measured too unless `--no-compile`;
a failure is reported in the table, not raised.

Same threads: both frameworks get the CPUs in this process's affinity mask (`--threads N` first
restricts the mask to N cores, before JAX or torch start). XLA:CPU sizes its thread pool from
that mask; torch gets `torch.set_num_threads(N)`. The printout states both.

Peak: the GFLOP/s of a 4096² matmul under JAX in the run's dtype (bfloat16: bfloat16 operands,
float32 accumulation and result, the fast form on CPUs with bfloat16 dot instructions), measured
in the same run (before, between and after the models; the best median is the machine's
practical peak). Each effvit forward's achieved GFLOP/s is 2 · GMACs (effvit.profile.model_cost:
the papers' count, matmuls and convs only) · images/s, shown as a fraction of that peak. timm's
forward is given the same count (its model's GMACs), and `ceiling` = peak / timm's GFLOP/s is
the inference ratio effvit would reach at 100% of the peak: a target above it cannot be met on
this machine. Training rows do the same with a step counted as 3 forwards (the usual
convention: the backward's two matmuls per forward matmul, for the input and the weight
gradients; the optimizer and the norms are not counted), so their ceiling bounds the training
ratio.

Allocator: on some VMs every fresh large buffer costs page faults that dominate elementwise
work, for both frameworks. `--malloc tuned` makes glibc keep freed memory for the whole
process (effvit.profile.tune_cpu_allocator: no mmap for large blocks, no trimming, one arena),
so both frameworks run with it; the default leaves glibc as it is. The setting is printed with
the results.

On a GPU (JAX's default backend), timm runs on CUDA in the same process (JAX's memory
preallocation is off so that both fit), `--dtype bfloat16` is timm under
`torch.autocast("cuda", torch.bfloat16)`, the peak matmul is 8192², and an `MFU` column gives
the model FLOP/s (as counted above) over the GPU's dense bfloat16 tensor-core peak from its
data sheet (`--peak-tflops` for GPUs the table below does not know, or other dtypes).

LaViT has no timm model: lavit_small is compared with timm's pvt_v2_b2 (same PVTv2 layout,
attention in every layer), and effvit's all-vanilla-attention layout of lavit_small
(`lavit_small_allva`, va_layers = depths) is listed against the same reference.

The script also reports the jit compile time (lower + compile) of pvt_v2_b2's train step at
the first batch size (`--no-compile-time` skips it), and ends with a verdict per row against
`--targets` (effvit / timm eager; by default 3x for inference and 2x for training, the
performance issue's): met, missed but reachable (the % of the peak effvit would need), or
above the ceiling, which no implementation can reach on this machine.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import traceback

# No JAX or torch at import: main() sets the cores and the allocator before they start.
from effvit.benchmark_utils import EffvitRunner, TimmRunner, interleave, set_threads, timed, warm

MODES = ("inference", "train")
ALL_MODELS = ("pvt_v2_b0", "pvt_v2_b2", "twins_pcpvt_small", "twins_svt_small", "resnest50d",
              "lavit_small")
# Dense (no sparsity) bfloat16 tensor-core TFLOP/s from NVIDIA's data sheets, for MFU; the
# first name found in the device kind wins (so "H100 PCIe" before "H100").
SPEC_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0))
# effvit name -> (timm reference name, effvit overrides, note); None: no timm model.
REFERENCES = {
    "lavit_small": ("pvt_v2_b2", {}, "timm has no LaViT: reference is pvt_v2_b2"),
    "lavit_small_allva": ("pvt_v2_b2", {"va_layers": (3, 4, 6, 3)},
                          "lavit_small with every layer vanilla attention; ref pvt_v2_b2"),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(ALL_MODELS),
                 help="comma-separated effvit names (also lavit_small_allva)")
  p.add_argument("--batch", default="8,32", help="comma-separated batch sizes")
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--steps", type=int, default=3, help="timed calls per repetition")
  p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median)")
  p.add_argument("--warmup", type=int, default=3,
                 help="untimed interleaved rounds after the first call of each")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--threads", type=int, default=0, help="cores to use (default: all usable)")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
  p.add_argument("--no-compile-time", action="store_true",
                 help="skip timing the jit compile of pvt_v2_b2's train step")
  p.add_argument("--malloc", default="default", choices=("default", "tuned"))
  p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's spec peak for the MFU column (default: known GPUs, bfloat16)")
  p.add_argument("--targets", default="inference=3,train=2",
                 help="ratios to judge each row against, as mode=ratio pairs")
  args = p.parse_args(argv)
  try:
    args.targets = {m: float(v) for m, v in (t.split("=") for t in args.targets.split(","))}
  except ValueError:
    p.error(f"--targets takes mode=ratio pairs, e.g. inference=3,train=2; got {args.targets!r}")
  if set(args.targets) - set(MODES):
    p.error(f"--targets' modes are inference and train; got {sorted(args.targets)}")
  unknown = set(args.modes.split(",")) - set(MODES)
  if unknown:
    p.error(f"--modes takes inference and/or train, comma-separated; got {sorted(unknown)}")
  return args


# --- measurement ----------------------------------------------------------------------------

def spec_peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The data-sheet peak of a known GPU in bfloat16, else None (no MFU column)."""
  if dtype != "bfloat16":
    return None
  return next((t for name, t in SPEC_BF16_TFLOPS if name in device_kind), None)


def matmul_gflops(jax, jnp, dtype: str = "float32", n: int = 4096, reps: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  t = statistics.median(timed(lambda: f(a).block_until_ready(), 1) for _ in range(reps))
  return 2 * n**3 / t / 1e9


def reference_gmacs(name: str, ref_name: str, res: int, effvit_gmacs: float) -> float:
  """GMACs of the timm reference's forward: effvit's count of the same architecture."""
  if name not in REFERENCES:   # timm's model of the same name: the same architecture
    return effvit_gmacs
  from effvit.models import create_model
  from effvit.profile import model_cost
  return model_cost(create_model(ref_name), res)["gmacs"]


# --- the run --------------------------------------------------------------------------------

def run_one(name: str, batch: int, args, peak: float, rows: list) -> None:
  import torch
  ref_name, overrides, note = REFERENCES.get(name, (name, {}, ""))
  eff = EffvitRunner.from_name(name.replace("_allva", ""), overrides, batch, args.res,
                              args.dtype, modes=args.modes.split(","))
  timm_eager = TimmRunner(ref_name, batch, args.res, args.dtype, compiled=False)
  timm_comp, comp_error = None, ""
  if not args.no_compile:
    try:
      torch._dynamo.reset()
      timm_comp = TimmRunner(ref_name, batch, args.res, args.dtype, compiled=True)
    except Exception as e:   # noqa: BLE001  (reported, not raised)
      comp_error = f"{type(e).__name__}: {e}".splitlines()[0][:80]
  for mode in args.modes.split(","):
    runners = {"effvit": getattr(eff, "infer" if mode == "inference" else "train"),
               "timm": getattr(timm_eager, "infer" if mode == "inference" else "train")}
    first = {k: warm(fn, calls=1) for k, fn in runners.items()}
    if timm_comp is not None:
      fn = getattr(timm_comp, "infer" if mode == "inference" else "train")
      try:
        first["timm_compiled"] = warm(fn, calls=1)
        runners["timm_compiled"] = fn
      except Exception as e:   # noqa: BLE001
        comp_error = f"{type(e).__name__}: {e}".splitlines()[0][:80]
        print(f"  torch.compile failed for {ref_name} ({mode}): {comp_error}", file=sys.stderr)
        traceback.print_exc(limit=2)
    sec = interleave(runners, args.steps, args.reps, warmup=args.warmup)
    ips = {k: batch / v for k, v in sec.items()}
    row = dict(model=name, ref=ref_name, batch=batch, mode=mode, effvit=ips["effvit"],
               timm=ips["timm"], timm_compiled=ips.get("timm_compiled"),
               compile_error=comp_error if "timm_compiled" not in ips and not args.no_compile
               else "", first_call=first, note=note)
    flops = 2 if mode == "inference" else 6   # per MAC of the forward; a step = 3 forwards
    row["gflops"] = flops * eff.gmacs * ips["effvit"]
    row["timm_gflops"] = flops * reference_gmacs(name, ref_name, args.res, eff.gmacs) * ips["timm"]
    row["peak_frac"] = row["gflops"] / peak
    if args.peak_tflops:
      row["mfu"] = row["gflops"] / (1e3 * args.peak_tflops)
    rows.append(row)
    print(format_row(row), flush=True)
  del eff, timm_eager, timm_comp
  gc.collect()


def fmt(v, spec=".1f"):
  return "-" if v is None else format(v, spec)


def format_row(r: dict) -> str:
  comp = r["timm_compiled"]
  return (f"{r['model']:<18} b{r['batch']:<3} {r['mode']:<9} effvit {r['effvit']:7.1f} img/s  "
          f"timm {r['timm']:7.1f} ({r['effvit'] / r['timm']:.2f}x)  compiled "
          f"{fmt(comp)} ({fmt(comp and r['effvit'] / comp, '.2f')}x)"
          + (f"  {r['gflops']:.0f} GFLOP/s = {100 * r['peak_frac']:.0f}% of peak (timm "
             f"{r['timm_gflops']:.0f})" if "gflops" in r else "")
          + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""))


def table(rows: list, markdown: bool) -> str:
  head = ["model", "timm ref", "batch", "mode", "effvit img/s", "timm eager img/s", "ratio",
          "timm compiled img/s", "ratio", "effvit GFLOP/s", "% of matmul peak",
          "timm % of peak", "ceiling", "MFU %"]
  lines = []
  for r in rows:
    comp = r["timm_compiled"]
    lines.append([r["model"], r["ref"], str(r["batch"]), r["mode"], fmt(r["effvit"]),
                  fmt(r["timm"]), f"{r['effvit'] / r['timm']:.2f}x",
                  fmt(comp) if comp else ("failed" if r["compile_error"] else "-"),
                  f"{r['effvit'] / comp:.2f}x" if comp else "-",
                  fmt(r.get("gflops"), ".0f"),
                  fmt(r.get("peak_frac") and 100 * r["peak_frac"], ".0f"),
                  fmt(r.get("timm_peak_frac") and 100 * r["timm_peak_frac"], ".0f"),
                  fmt(r.get("timm_peak_frac") and 1 / r["timm_peak_frac"], ".2f"),
                  fmt(r.get("mfu") and 100 * r["mfu"], ".1f")])
  if markdown:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(l) + " |" for l in lines]
    return "\n".join(out)
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
  fmt_line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([fmt_line(head)] + [fmt_line(l) for l in lines])


def verdicts(rows: list, targets: dict) -> list:
  """One line per row with a target: met, missed but reachable (effvit would need this share
  of the matmul peak), or above the ceiling (peak / timm's GFLOP/s): unreachable here."""
  lines = []
  for r in rows:
    target = targets.get(r["mode"])
    if target is None:
      continue
    ratio = r["effvit"] / r["timm"]
    head = f"{r['model']} b{r['batch']} {r['mode']}: {ratio:.2f}x of {target:g}x"
    if ratio >= target:
      lines.append(f"{head}, met")
    elif target * r["timm_peak_frac"] > 1:
      lines.append(f"{head}, missed; above the ceiling ({1 / r['timm_peak_frac']:.2f}x): "
                   "unreachable on this machine")
    else:
      lines.append(f"{head}, missed; reachable at {100 * target * r['timm_peak_frac']:.0f}% "
                   f"of the peak (effvit runs at {100 * r['peak_frac']:.0f}%)")
  return lines


def machine_info(threads: int) -> str:
  import platform
  import jax
  gpu = jax.devices()[0].device_kind + ", " if jax.default_backend() == "gpu" else ""
  model = "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next(l for l in f if l.startswith("flags")).split()
    model += " (AVX-512)" if "avx512f" in flags else ""
  except (OSError, StopIteration):
    pass
  load = os.getloadavg()
  return (f"{gpu}{model}, {threads} cores used, {platform.python_version()}, load average "
          f"{load[0]:.2f} at the end")


def main(argv=None):
  args = parse_args(argv)
  threads = set_threads(args.threads)
  if args.malloc == "tuned":
    from effvit.profile import tune_cpu_allocator   # before JAX / torch allocate anything
    if not tune_cpu_allocator():
      raise SystemExit("--malloc tuned needs glibc")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory to torch
  import jax
  import jax.numpy as jnp
  import torch
  import flax
  from effvit.reference import import_timm
  torch.set_num_threads(threads)
  timm = import_timm()
  if torch.get_num_threads() != threads:
    raise SystemExit(f"torch uses {torch.get_num_threads()} threads, wanted {threads}")
  print(f"jax {jax.__version__} (flax {flax.__version__}) on {jax.devices()[0].platform}, "
        f"XLA thread pool sized by the affinity mask: {threads} cores; torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads; timm {timm.__version__}; "
        f"dtype {args.dtype}; malloc {args.malloc}; {args.res}px", flush=True)

  gpu = jax.default_backend() == "gpu"
  n = 8192 if gpu else 4096
  if args.peak_tflops is None:
    args.peak_tflops = spec_peak_tflops(jax.devices()[0].device_kind, args.dtype) if gpu else None
  peaks = [matmul_gflops(jax, jnp, args.dtype, n)]
  print(f"{args.dtype} {n}² matmul: {peaks[0]:.0f} GFLOP/s", flush=True)
  compile_s = None
  batches = [int(b) for b in args.batch.split(",")]
  if not args.no_compile_time:
    compile_s = EffvitRunner.from_name("pvt_v2_b2", {}, batches[0], args.res, args.dtype,
                                       modes=("train",)).compile_seconds["train"]
    print(f"pvt_v2_b2 train step (batch {batches[0]}): jit lower + compile {compile_s:.1f} s",
          flush=True)
  rows = []
  for batch in batches:
    for name in args.models.split(","):
      run_one(name, batch, args, max(peaks), rows)
    peaks.append(matmul_gflops(jax, jnp, args.dtype, n))
  peak = max(peaks)
  # Fractions against the best peak seen in the run.
  for r in rows:
    if "gflops" in r:
      r["peak_frac"] = r["gflops"] / peak
      r["timm_peak_frac"] = r["timm_gflops"] / peak
  print()
  print(f"Machine: {machine_info(threads)}")
  print(f"Threads: XLA {threads} (affinity mask), torch {torch.get_num_threads()}; malloc "
        f"{args.malloc}; dtype {args.dtype}; {args.res}x{args.res}; medians of {args.reps} "
        f"interleaved repetitions of {args.steps} calls after {args.warmup} warm-up rounds")
  print(f"Matmul peak ({args.dtype} {n}², JAX): {peak:.0f} GFLOP/s "
        f"(measurements: {', '.join(f'{p:.0f}' for p in peaks)})")
  if args.peak_tflops:
    print(f"MFU against a spec peak of {args.peak_tflops:g} TFLOP/s")
  if compile_s is not None:
    print(f"jit compile of the pvt_v2_b2 train step (batch {batches[0]}): {compile_s:.1f} s")
  notes = sorted({f"{r['model']}: {r['note']}" for r in rows if r["note"]})
  notes += sorted({f"torch.compile failed for {r['ref']}: {r['compile_error']}" for r in rows
                   if r["compile_error"]})
  for n in notes:
    print(f"Note: {n}")
  print()
  print(table(rows, args.markdown))
  lines = verdicts(rows, args.targets)
  if lines:
    print()
    print(f"Against the targets ({', '.join(f'{m} {t:g}x' for m, t in args.targets.items())}):")
    print("\n".join(lines))
  return rows


if __name__ == "__main__":
  main()
