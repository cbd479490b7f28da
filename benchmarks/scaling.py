"""How each token mixer's cost grows with the number of tokens N, in one stride-4 stage.

    python benchmarks/scaling.py                               # ~1-2 min on a 2-core CPU
    python benchmarks/scaling.py --res 224,448 --reps 3 --out /tmp/scaling

One mixer layer (no FFN, no norm) of width C = 64 with h = 1 head on the stage-1 token grid of
a stride-4 patch embedding (224 px -> 56x56 = 3136 tokens, 896 px -> 224x224 = 50176):

    mhsa            global attention                      N² attention entries
    sra_r8/4/2      SRA, keys from a k = s = R conv        N·N/R²
    linear_sra_p7   linear SRA, keys pooled to 7x7         N·49
    lsa_w7          Twins LSA, 7x7 windows                 N·49
    lsa_w7+gsa_r8   a Twins-SVT pair, LSA then GSA (SRA R = 8), reported per layer (pair / 2)
    less_la_r8      a LaViT less-attention layer following a VA layer (SRA R = 8): the VA's
                    N×M attention is its input; Θ (M×M) and Ψ (N×N) transform it

For every resolution: GMACs from the traced shapes (effvit.profile.count_macs on
jax.eval_shape'd parameters: nothing is computed, so every point has a value), XLA's temporary
memory from the compiled plan (compiled.memory_analysis().temp_size_in_bytes: compiling
allocates nothing, so every point that compiles has one), and the forward time (jit, batch 1,
median of --reps repetitions after a warm-up, each repetition the mean of enough calls to
last ~50 ms) only where the largest attention-like matrix has at most
--max-attn-entries entries; other cells are "—". For less_la_r8 that matrix is Ψ itself (N²).

Growth exponents: a least-squares line through (log N, log y) over all points that have a
value, and the local slope between consecutive resolutions. GMACs of a mixer with a fixed
key count (linear SRA, LSA) grow as N; SRA's are a·N + b·N²/R²: the N² term wins only once N
exceeds ~R²·C, so its measured exponent lies between 1 and 2 and rises with N. Writes
scaling.csv, scaling.md and scaling.png (log-log, one line per mixer) under --out.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import pathlib
import statistics
import sys
import time

import flax.linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's effvit
from effvit.attention.less import LessAttention, LessCarry, reduced_grid
from effvit.attention.locally_grouped import LocallyGroupedAttention
from effvit.attention.spatial_reduction import SpatialReductionAttention

HERE = pathlib.Path(__file__).resolve().parent
DIM, HEADS, STRIDE = 64, 1, 4
MIXERS = ("mhsa", "sra_r8", "sra_r4", "sra_r2", "linear_sra_p7", "lsa_w7", "lsa_w7+gsa_r8",
          "less_la_r8")
DASH = "—"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--res", default="224,448,672,896", help="input sizes in pixels")
  p.add_argument("--mixers", default=",".join(MIXERS))
  p.add_argument("--reps", type=int, default=7, help="timed calls per point (median)")
  p.add_argument("--max-attn-entries", type=float, default=2e8,
                 help="time only points whose largest attention matrix is at most this")
  p.add_argument("--out", default=str(HERE / "results"))
  p.add_argument("--malloc", default="default", choices=("default", "tuned"),
                 help="tuned: glibc keeps freed memory (effvit.profile.tune_cpu_allocator)")
  return p.parse_args(argv)


def grid(res: int) -> tuple[int, int]:
  return res // STRIDE, res // STRIDE


def attn_entries(kind: str, hw: tuple[int, int]) -> int:
  """Entries of the largest N×M (or N×N) matrix the mixer materialises, per head."""
  n = hw[0] * hw[1]
  reduced = lambda r: (hw[0] // r) * (hw[1] // r)
  if kind == "mhsa":
    return n * n
  if kind.startswith("sra_r"):
    return n * reduced(int(kind[5:]))
  if kind in ("linear_sra_p7", "lsa_w7"):
    return n * 49
  if kind == "lsa_w7+gsa_r8":
    return n * max(49, reduced(8))
  if kind == "less_la_r8":
    return max(n * reduced(8), n * n)
  raise ValueError(kind)


class TwinsPair(nn.Module):
  """LSA then GSA (= SRA, R = 8) with a residual between them, as Twins-SVT alternates them."""

  @nn.compact
  def __call__(self, x, hw):
    x = x + LocallyGroupedAttention(HEADS, window=7)(x, hw)[0]
    return SpatialReductionAttention(HEADS, sr_ratio=8)(x, hw)


def build(kind: str, hw: tuple[int, int]):
  """(fn(variables, *inputs) -> output, init(rng, *inputs) -> variables, abstract inputs,
  layers per call)."""
  import jax
  import jax.numpy as jnp
  n = hw[0] * hw[1]
  x = jax.ShapeDtypeStruct((1, n, DIM), jnp.float32)
  layers = 1
  if kind == "mhsa":
    module = SpatialReductionAttention(HEADS, sr_ratio=1)
  elif kind.startswith("sra_r"):
    module = SpatialReductionAttention(HEADS, sr_ratio=int(kind[5:]))
  elif kind == "linear_sra_p7":
    module = SpatialReductionAttention(HEADS, linear=True, pool_size=7)
  elif kind == "lsa_w7":
    module = LocallyGroupedAttention(HEADS, window=7)
  elif kind == "lsa_w7+gsa_r8":
    module, layers = TwinsPair(), 2
  elif kind == "less_la_r8":
    k_hw = reduced_grid(hw, 8)
    a = jax.ShapeDtypeStruct((1, HEADS, n, k_hw[0] * k_hw[1]), jnp.float32)
    carry = LessCarry(a, a, hw, k_hw)
    module = LessAttention(HEADS, sr_ratio=8, la=True, grid=hw, dp_loss="none")
    fn = lambda v, x, c: module.apply(v, x, hw, carry=c)[0]
    init = lambda r, x, c: module.init(r, x, hw, carry=c)
    return fn, init, (x, carry), layers
  else:
    raise ValueError(f"unknown mixer {kind!r}; choose from {', '.join(MIXERS)}")
  fn = lambda v, x: module.apply(v, x, hw)[0]
  init = lambda r, x: module.init(r, x, hw)
  return fn, init, (x,), layers


def measure(kind: str, res: int, args) -> dict:
  import jax
  import numpy as np
  from effvit.benchmark_utils import aot_compile, compiled_memory, timed, warm
  from effvit.profile import count_macs, count_params

  hw = grid(res)
  fn, init, inputs, layers = build(kind, hw)
  entries = attn_entries(kind, hw)
  variables = jax.eval_shape(init, jax.random.key(0), *inputs)
  row = {"mixer": kind, "res": res, "tokens": hw[0] * hw[1], "attn_entries": entries,
         "params": count_params(variables["params"]) / layers,
         "gmacs": count_macs(fn, variables, *inputs) / layers / 1e9,
         "time_ms": None, "time_min_ms": None, "temp_mib": None, "compile_s": None}
  try:
    compiled, row["compile_s"] = aot_compile(fn, variables, *inputs)
    row["temp_mib"] = compiled_memory(compiled).get("temp", float("nan")) / 2**20
  except Exception as e:  # noqa: BLE001  (a point too large for XLA: reported, not raised)
    print(f"  {kind} at {res}: compile failed: {str(e).splitlines()[0][:100]}", file=sys.stderr)
    return row
  if entries > args.max_attn_entries:
    return row
  rng = np.random.default_rng(0)
  real = jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape, np.float32)),
                      inputs)
  if kind == "less_la_r8":   # LA's input is a VA attention: rows that sum to one
    a = jax.nn.softmax(real[1].matrix, axis=-1)
    real = (real[0], real[1].replace(matrix=a, probs=a))
  params = jax.jit(init)(jax.random.key(0), *real)
  call = lambda: compiled(params, *real).block_until_ready()
  # Calls per repetition: enough for ~50 ms, so a millisecond call is not one scheduler tick.
  warm(call, 1)
  calls = max(1, math.ceil(0.05 / max(timed(call, 1), 1e-6)))
  times = [timed(call, calls) for _ in range(args.reps)]
  row["time_ms"] = statistics.median(times) * 1e3 / layers
  row["time_min_ms"] = min(times) * 1e3 / layers
  del params, real
  return row


def fit(tokens: list[int], values: list) -> tuple[float | None, list[float | None]]:
  """(least-squares slope of log value vs log N, local slopes between consecutive points)."""
  import numpy as np
  pts = [(n, v) for n, v in zip(tokens, values) if v]
  slope = (float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])
           if len(pts) >= 2 else None)
  local = []
  for (n0, v0), (n1, v1) in zip(zip(tokens, values), zip(tokens[1:], values[1:])):
    local.append(math.log(v1 / v0) / math.log(n1 / n0) if v0 and v1 else None)
  return slope, local


def exponents(rows: list[dict], mixers: list[str]) -> list[dict]:
  out = []
  for m in mixers:
    rs = [r for r in rows if r["mixer"] == m]
    tokens = [r["tokens"] for r in rs]
    entry = {"mixer": m}
    for key in ("gmacs", "time_ms", "temp_mib"):
      entry[key], entry[f"{key}_local"] = fit(tokens, [r[key] for r in rs])
    out.append(entry)
  return out


def fmt(v, spec: str) -> str:
  return DASH if v is None else format(v, spec)


def markdown(rows: list[dict], exps: list[dict], resolutions: list[int], args, machine: str) -> str:
  mixers = [e["mixer"] for e in exps]
  cell = {(r["mixer"], r["res"]): r for r in rows}
  head = "| mixer | " + " | ".join(f"{r} px (N={grid(r)[0] * grid(r)[1]})"
                                   for r in resolutions) + " |"
  sep = "|---|" + "---:|" * len(resolutions)
  lines = [f"# Token-mixer scaling: one stride-4 stage, C = {DIM}, h = {HEADS}, batch 1", "",
           f"{machine}. Time: forward only, jit, median of {args.reps} repetitions (each the "
           f"mean of enough calls for ~50 ms; the CSV also has the minimum), per layer "
           f"(lsa_w7+gsa_r8: the pair / 2), measured only where the largest attention matrix "
           f"has at most {args.max_attn_entries:.0e} entries ({DASH}: skipped). GMACs: from "
           "the traced shapes (no compute). Memory: XLA's temporary buffers of the compiled "
           "forward (static plan; compiled, never run, where the time is skipped); parameters are "
           "arguments, not temporaries (less_la_r8's Ψ is N² of them).", ""]
  for key, title, spec in (("gmacs", "GMACs per layer", ".4g"),
                           ("time_ms", "Forward time per layer (ms)", ".3g"),
                           ("temp_mib", "XLA temporary memory (MiB)", ".4g"),
                           ("params", "Parameters per layer", ".4g")):
    lines += [f"## {title}", "", head, sep]
    for m in mixers:
      lines.append(f"| {m} | " + " | ".join(fmt(cell[(m, r)][key], spec) for r in resolutions)
                   + " |")
    lines.append("")
  pairs = " / ".join(f"{a}→{b}" for a, b in zip(resolutions, resolutions[1:]))
  lines += ["## Growth exponent in N", "",
            f"Fit: least-squares slope of log y vs log N over the points with a value. Local: "
            f"slope between consecutive resolutions ({pairs} px).", "",
            "| mixer | GMACs fit | GMACs local | time fit | time local | memory fit |",
            "|---|---:|---:|---:|---:|---:|"]
  local = lambda v: ", ".join(fmt(x, ".2f") for x in v)
  for e in exps:
    lines.append(f"| {e['mixer']} | {fmt(e['gmacs'], '.2f')} | {local(e['gmacs_local'])} | "
                 f"{fmt(e['time_ms'], '.2f')} | {local(e['time_ms_local'])} | "
                 f"{fmt(e['temp_mib'], '.2f')} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], mixers: list[str], path: str, machine: str, args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), dpi=110)
  panels = (("gmacs", "GMACs per layer (traced)"),
            ("time_ms", f"forward time per layer (ms), median of {args.reps}\n(not run above "
                        f"{args.max_attn_entries:.0e} attention entries)"),
            ("temp_mib", "XLA temporary memory (MiB)"))
  markers = "os^v<>Dph*"
  tokens = sorted({r["tokens"] for r in rows})
  for ax, (key, label) in zip(axes, panels):
    for i, m in enumerate(mixers):
      pts = [(r["tokens"], r[key]) for r in rows if r["mixer"] == m and r[key]]
      if pts:
        ax.plot(*zip(*pts), marker=markers[i % len(markers)], label=m, lw=1.6)
    ys = [r[key] for r in rows if r[key]]
    if ys:   # guides: slopes 1 and 2 through the geometric middle of the panel
      n = np.array(tokens, float)
      mid_n, mid_y = math.sqrt(n[0] * n[-1]), math.sqrt(min(ys) * max(ys))
      for k, style in ((1, ":"), (2, "--")):
        ax.plot(n, mid_y * (n / mid_n) ** k, color="0.55", ls=style, lw=1,
                label=f"∝ N^{k} (guide)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(tokens)
    ax.set_xticklabels([f"{t}\n({int(math.sqrt(t)) * STRIDE} px)" for t in tokens], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("tokens N (input size)")
    ax.set_ylabel(label.split("\n")[0])
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8, loc="upper left")
  fig.suptitle(f"Token-mixer scaling, one stride-4 stage (C={DIM}, h={HEADS}, batch 1); "
               f"{machine}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])


def main(argv=None):
  args = parse_args(argv)
  if args.malloc == "tuned":
    from effvit.profile import tune_cpu_allocator   # before JAX allocates anything
    tune_cpu_allocator()
  import jax
  resolutions = [int(r) for r in args.res.split(",")]
  mixers = [m for m in args.mixers.split(",") if m]
  for m in mixers:
    if m not in MIXERS:
      raise SystemExit(f"unknown mixer {m!r}; choose from {', '.join(MIXERS)}")
  cores = len(os.sched_getaffinity(0))
  machine = f"jax {jax.__version__} on {jax.devices()[0].platform}, {cores} cores"
  print(machine, flush=True)
  t0, rows = time.time(), []
  for m in mixers:
    for res in resolutions:
      row = measure(m, res, args)
      rows.append(row)
      print(f"{m:<15} {res:4d} px  N={row['tokens']:6d}  {row['gmacs']:9.4f} GMACs  "
            f"{fmt(row['time_ms'], '.2f'):>9} ms  {fmt(row['temp_mib'], '.1f'):>9} MiB temp  "
            f"{row['params'] / 1e6:9.3f} M params",
            flush=True)
  exps = exponents(rows, mixers)
  print("\nexponent of N (fit over all points; local slopes)")
  for e in exps:
    print(f"{e['mixer']:<15} GMACs {fmt(e['gmacs'], '.2f')} "
          f"({', '.join(fmt(x, '.2f') for x in e['gmacs_local'])})   time "
          f"{fmt(e['time_ms'], '.2f')} ({', '.join(fmt(x, '.2f') for x in e['time_ms_local'])})")
  os.makedirs(args.out, exist_ok=True)
  write_csv(rows, os.path.join(args.out, "scaling.csv"))
  # Other processes on the machine disturb the times: the load average goes in the report.
  machine += f", load average {os.getloadavg()[0]:.1f} at the end"
  with open(os.path.join(args.out, "scaling.md"), "w", encoding="utf-8") as f:
    f.write(markdown(rows, exps, resolutions, args, machine))
  plot(rows, mixers, os.path.join(args.out, "scaling.png"), machine, args)
  print(f"\n{time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}; wrote scaling.csv, "
        f"scaling.md, scaling.png in {args.out}")
  return rows, exps


if __name__ == "__main__":
  main()
