"""Ablation sweeps: one training per grid point, then a table and plots.

  python -m effvit.sweep --config=configs/quickstart.py --workdir=runs/sr \\
      --grid='model.sr_ratios=[(8,4,2,1),(4,2,1,1),(2,2,1,1),(1,1,1,1)]'

Several --grid flags make a product. Every config field is sweepable (SRA ratios, linear-SRA
pool sizes, LSA windows, radix / cardinality, LaViT's va_layers and dp-loss weight, the
per-stage mixers, ...). Each point trains in its own workdir <workdir>/<point>/, so an
interrupted sweep resumes where it stopped and finished points are skipped. At the end the
sweep writes <workdir>/results.csv, results.md and PNG plots (accuracy vs GMACs, images/s vs
GMACs), with the model cost (params, GMACs, inference images/s) measured for each point.
"""
from __future__ import annotations

import ast
import copy
import csv
import itertools
import json
import logging
import os
import re
import statistics
import sys
import time

from absl import flags

from effvit import cli
from effvit.errors import ConfigError

_GRID = flags.DEFINE_multi_string("grid", [], "key=[v1, v2, ...] (Python literals); repeat "
                                  "for a product.")
_BENCH = flags.DEFINE_integer("bench_batch", 32, "Batch size for the inference images/s column.")

log = logging.getLogger("effvit")
RESULT = "result.json"


def parse_grid(specs: list[str]) -> list[tuple[str, list]]:
  grid = []
  for spec in specs:
    key, sep, values = spec.partition("=")
    try:
      values = ast.literal_eval(values) if sep else None
    except (ValueError, SyntaxError):
      values = None
    if not isinstance(values, (list, tuple)) or not values:
      raise ConfigError(f"--grid={spec!r}: expected key=[v1, v2, ...] with Python literals")
    grid.append((key.strip(), list(values)))
  if not grid:
    raise ConfigError("give at least one --grid=key=[v1, v2, ...]")
  return grid


def set_field(config, key: str, value) -> None:
  node, parts = config, key.split(".")
  for i, part in enumerate(parts[:-1]):
    if part not in node:
      raise ConfigError(f"--grid key {key!r}: config has no {'.'.join(parts[:i + 1])!r}")
    node = node[part]
  if parts[-1] not in node:
    raise ConfigError(f"--grid key {key!r}: config has no field {key!r}")
  old = node[parts[-1]]
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[parts[-1]] = value
  except TypeError as e:
    raise ConfigError(f"--grid {key}={value!r}: {e}") from None


def point_name(point: dict) -> str:
  def fmt(v):
    if isinstance(v, (tuple, list)):
      return "-".join(fmt(x) for x in v)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(v))
  return ",".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in point.items())


def measure_cost(config, bench_batch: int) -> dict:
  """Params, GMACs and jitted inference images/s at the training resolution."""
  import jax
  import jax.numpy as jnp
  from effvit.benchmark_utils import aot_compile, timed, warm
  from effvit.models import create_model
  from effvit.profile import model_cost
  model = create_model(config.model_name, **config.model)
  size = config.input.image_size
  cost = model_cost(model, size)
  x = jnp.zeros((bench_batch, size, size, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  fwd, _ = aot_compile(lambda v, x: model.apply(v, x), variables, x)
  run = lambda: fwd(variables, x).block_until_ready()
  warm(run)
  seconds = statistics.median(timed(run, 1) for _ in range(5))
  return {"params": cost["params"], "gmacs": cost["gmacs"],
          "infer_images_per_sec": bench_batch / seconds}


def train_images_per_sec(workdir: str) -> float:
  """Median training throughput logged in metrics.jsonl (the first log interval, which
  includes compilation, is left out)."""
  rates = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if "train/images_per_sec" in rec:
        rates.append(rec["train/images_per_sec"])
  rates = rates[1:] or rates
  return sorted(rates)[len(rates) // 2] if rates else float("nan")


def run_point(config, workdir: str, point: dict, bench_batch: int) -> dict:
  from effvit.train.loop import train_and_evaluate
  path = os.path.join(workdir, RESULT)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      log.info("sweep point %s: finished earlier, skipping", point_name(point))
      return {**json.load(f), **point}   # the grid's values: JSON has no tuples
  t0 = time.time()
  final = train_and_evaluate(config, workdir)
  result = {**{k: v for k, v in point.items()}, **measure_cost(config, bench_batch),
            "train_images_per_sec": train_images_per_sec(workdir),
            "wall_seconds": time.time() - t0,
            **{k: v for k, v in final.items() if k.endswith(("/top1", "/top5", "/loss"))}}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, default=str)
  return result


def write_reports(workdir: str, rows: list[dict], keys: list[str]) -> None:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(os.path.join(workdir, "results.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  plot(workdir, rows, keys)


def accuracy_key(row: dict) -> str | None:
  """The top-1 to plot: the first evaluation's (e.g. test/top1), train/top1 only if no eval."""
  tops = [k for k in row if k.endswith("/top1")]
  return next((k for k in tops if not k.startswith("train/")), tops[0] if tops else None)


def plot(workdir: str, rows: list[dict], keys: list[str]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  acc_key = accuracy_key(rows[0])
  label = lambda r: ", ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys)
  panels = [(acc_key, f"top-1 accuracy ({acc_key})", "accuracy_vs_gmacs.png"),
            ("train_images_per_sec", "training images/s", "throughput_vs_gmacs.png"),
            ("infer_images_per_sec", "inference images/s", "inference_vs_gmacs.png")]
  for key, ylabel, name in panels:
    if key is None:
      continue
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for i, r in enumerate(rows):
      ax.scatter(r["gmacs"], r[key], s=40)
      # Alternate the labels above and below: neighbouring points often have similar costs.
      ax.annotate(label(r), (r["gmacs"], r[key]), fontsize=7,
                  xytext=(4, 6 if i % 2 == 0 else -12), textcoords="offset points")
    ax.margins(x=0.2, y=0.15)   # room for the labels
    ax.set_xlabel("GMACs per image (training resolution)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs GMACs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, name))
    plt.close(fig)


def main(config, workdir):
  if not workdir:
    raise ConfigError("--workdir is required")
  grid = parse_grid(_GRID.value)
  keys = [k for k, _ in grid]
  points = [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in grid))]
  from effvit.train.loop import validate
  configs = []
  for point in points:   # validate every point (model, sizes, data, workdir) before training
    c = copy.deepcopy(config)
    with c.unlocked():
      for k, v in point.items():
        set_field(c, k, v)
    validate(c, os.path.join(workdir, point_name(point)))
    configs.append(c)
  t0, rows = time.time(), []
  for point, c in zip(points, configs):
    log.info("sweep point %d/%d: %s", len(rows) + 1, len(points), point_name(point))
    rows.append(run_point(c, os.path.join(workdir, point_name(point)), point, _BENCH.value))
  os.makedirs(workdir, exist_ok=True)
  write_reports(workdir, rows, keys)
  log.info("sweep of %d points done in %.0f s; results in %s/results.{csv,md} and *.png",
           len(points), time.time() - t0, workdir)


if __name__ == "__main__":
  cli.run(main, sys.argv)
