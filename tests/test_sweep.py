"""effvit.sweep end to end: a two-point reduction-ratio grid on the digits quickstart (a tiny
model, a few steps) writes results.csv, results.md and the plots; a re-run skips both points;
a bad grid is a one-line error with exit status 2 before anything is trained."""
import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One stage of the quickstart model (the pyramid takes any number): a quarter of the compiling.
TINY = ["--config.model.embed_dims=16,", "--config.model.depths=1,", "--config.model.num_heads=1,",
        "--config.model.mlp_ratios=2,", "--config.model.mixers=sra,", "--config.model.windows=7,",
        "--config.model.pool_sizes=7,", "--config.model.patch_strides=4,",
        "--config.model.va_layers=1,", "--config.total_steps=3",
        "--config.input.batch_size=16", "--config.evals.test.batch_size=64", "--bench_batch=4"]


def sweep(workdir, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device
  return subprocess.run(
      [sys.executable, "-m", "effvit.sweep", "--config=configs/quickstart.py",
       f"--workdir={workdir}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)


def test_sweep_writes_table_and_plots_and_skips_finished_points(tmp_path):
  grid = "--grid=model.sr_ratios=[(2,),(1,)]"
  first = sweep(tmp_path, grid, *TINY)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["model.sr_ratios"] for r in rows] == ["(2,)", "(1,)"]
  for r in rows:
    assert 0 <= float(r["test/top1"]) <= 1 and float(r["infer_images_per_sec"]) > 0
  # Full keys and values instead of reduced ones: R = 1 costs more (closed form in the
  # map of 8x8 tokens) and has fewer parameters (no reduction convs).
  assert float(rows[1]["gmacs"]) > float(rows[0]["gmacs"])
  assert int(rows[1]["params"]) < int(rows[0]["params"])
  table = (tmp_path / "results.md").read_text()
  assert table.count("\n") == 4 and "sr_ratios" in table
  for png in ("accuracy_vs_gmacs.png", "throughput_vs_gmacs.png", "inference_vs_gmacs.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  again = sweep(tmp_path, grid, *TINY)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("finished earlier, skipping") == 2
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    assert list(csv.DictReader(f)) == rows


def test_accuracy_plot_uses_the_evaluation_not_training_top1():
  from effvit.sweep import accuracy_key
  assert accuracy_key({"train/top1": 1.0, "test/top1": 0.9, "test/top5": 1.0}) == "test/top1"
  assert accuracy_key({"train/top1": 1.0, "gmacs": 1}) == "train/top1"
  assert accuracy_key({"gmacs": 1}) is None


def test_bad_grid_is_one_line_exit_2(tmp_path):
  for grid, words in [("--grid=model.sr_ratio=[(1,)]", "sr_ratio"),
                      ("--grid=model.sr_ratios=4", "expected key=[v1, v2, ...]")]:
    r = sweep(tmp_path / "w", grid, *TINY)
    assert r.returncode == 2 and words in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()[-1]) < 300
  assert not (tmp_path / "w").exists()
