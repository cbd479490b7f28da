"""effvit.sweep end to end: a two-point reduction-ratio grid on the digits quickstart (a tiny
model, a few steps) writes results.csv, results.md and the plots; a re-run skips both points;
a bad grid is a one-line error with exit status 2 before anything is trained.

The first sweep and one bad grid run as `python -m effvit.sweep`; the re-run and the other bad
grid go through the same entry point (effvit.cli.run) in-process, sparing a process's imports."""
import csv
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One stage of the quickstart model (the pyramid takes any number): a quarter of the compiling.
TINY = ["--config.model.embed_dims=16,", "--config.model.depths=1,", "--config.model.num_heads=1,",
        "--config.model.mlp_ratios=2,", "--config.model.mixers=sra,", "--config.model.windows=7,",
        "--config.model.pool_sizes=7,", "--config.model.patch_strides=4,",
        "--config.model.va_layers=1,", "--config.total_steps=3",
        "--config.input.batch_size=16", "--config.evals.test.batch_size=64", "--bench_batch=4"]


def argv(workdir, *args):
  return ["effvit.sweep", "--config=configs/quickstart.py", f"--workdir={workdir}", *args]


def sweep(workdir, *args):
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}   # one CPU device
  return subprocess.run([sys.executable, "-m", *argv(workdir, *args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def sweep_in_process(workdir, capsys, *args):
  """(exit status, stderr) of the sweep run through effvit.cli.run in this process."""
  from effvit import cli, sweep
  capsys.readouterr()
  cwd = os.getcwd()
  os.chdir(ROOT)   # the relative --config path
  try:
    with pytest.raises(SystemExit) as e:
      cli.run(sweep.main, argv(workdir, *args))
  finally:
    os.chdir(cwd)
  return e.value.code, capsys.readouterr().err


def test_sweep_writes_table_and_plots_and_skips_finished_points(tmp_path, capsys,
                                                                 restore_logging):
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
  code, err = sweep_in_process(tmp_path, capsys, grid, *TINY)
  assert code == 0, err[-3000:]
  assert err.count("finished earlier, skipping") == 2
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    assert list(csv.DictReader(f)) == rows


def test_accuracy_plot_uses_the_evaluation_not_training_top1():
  from effvit.sweep import accuracy_key
  assert accuracy_key({"train/top1": 1.0, "test/top1": 0.9, "test/top5": 1.0}) == "test/top1"
  assert accuracy_key({"train/top1": 1.0, "gmacs": 1}) == "train/top1"
  assert accuracy_key({"gmacs": 1}) is None


def test_bad_grid_is_one_line_exit_2(tmp_path, capsys, restore_logging):
  r = sweep(tmp_path / "w", "--grid=model.sr_ratio=[(1,)]", *TINY)
  assert r.returncode == 2 and "sr_ratio" in r.stderr, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]   # after TensorFlow's start-up lines
  assert last.startswith("error: ") and len(last) < 300, r.stderr[-2000:]
  code, err = sweep_in_process(tmp_path / "w", capsys, "--grid=model.sr_ratios=4", *TINY)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and "expected key=[v1, v2, ...]" in lines[0], err[-2000:]
  assert not (tmp_path / "w").exists()
