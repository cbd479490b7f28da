"""train.py end to end, in fresh processes: command-line overrides of every kind, SIGTERM saves
a checkpoint and exits, re-running the same command resumes it on another device count, the
workdir's files and the progress bar; user errors are one line, exit status 2, nothing written.

The subprocesses compile with XLA's backend optimisation off: a test-only speed-up (CPU code
generation is most of a tiny model's compile time); numerics do not matter here.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def env(devices: int) -> dict:
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0"}


def train_py(*args: str) -> list[str]:
  return [sys.executable, "train.py", *args]


def records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_saves_and_rerun_resumes_on_another_device_count(tmp_path):
  workdir, data = tmp_path / "run", tmp_path / "tfds"
  steps = 20
  command = train_py(
      "--config=configs/quickstart.py", f"--workdir={workdir}",
      f"--config.total_steps={steps}", "--config.log_every_steps=1",
      "--config.checkpoint_every_steps=0", "--config.eval_every_steps=0",
      "--config.input.batch_size=16", f"--config.input.data_dir={data}",
      f"--config.evals.test.data_dir={data}", "--config.evals.test.split=test[:40]",
      # Overrides of each kind: int tuple, string tuple, float, bool (--no), float tuple.
      "--config.model.sr_ratios=2,2,1,1", "--config.model.mixers=sra,sra,sra,mhsa",
      "--config.optimizer.base_lr=0.001", "--noconfig.input.flip",
      "--config.input.crop_scale=0.5,1.0")

  first = subprocess.Popen(command, cwd=ROOT, env=env(8), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not records(workdir):   # training has begun: the handlers are installed
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline, "no training step within 300 s"
      time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
  saved = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and 1 <= saved[0] < steps
  stop = saved[0]
  assert f"saved checkpoint at step {stop}" in err
  assert [r["step"] for r in records(workdir)] == list(range(1, stop + 1))

  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["sr_ratios"] == [2, 2, 1, 1]
  assert config["model"]["mixers"] == ["sra", "sra", "sra", "mhsa"]
  assert config["optimizer"]["base_lr"] == 0.001 and config["input"]["flip"] is False
  assert config["input"]["crop_scale"] == [0.5, 1.0]

  # The same command on 1 device: resumes from the 8-device checkpoint and finishes.
  second = subprocess.run(command, cwd=ROOT, env=env(1), capture_output=True, text=True,
                          timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  err = second.stderr
  assert f"resumed from checkpoint at step {stop}" in err
  assert re.search(rf"steps {stop} -> {steps}", err) and "1 devices" in err
  # The progress bar: step, ETA, loss, lr and images/s.
  bars = re.findall(r"step (\d+)/(\d+) \[[\d:]+<[\d:]+ ETA, loss=\d+\.\d+, lr=[\d.e+-]+, "
                    r"img/s=\d+\]", err)
  assert bars and bars[-1] == (str(steps), str(steps))

  log = records(workdir)
  assert [r["step"] for r in log] == list(range(1, steps + 1))   # one record per log step
  assert all({"train/loss", "train/lr"} <= set(r) for r in log)
  assert 0 <= log[-1]["test/top1"] <= 1 and log[-1]["test/examples"] == 40
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [stop,
                                                                                        steps]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


ERRORS = {
    "typo": (["--config=configs/quickstart.py", "--config.model.sr_ratio=4,2,1,1"],
             "error: unknown config field 'model.sr_ratio': model has no 'sr_ratio' (did you "
             "mean: sr_ratios"),
    "batch": (["--config=configs/quickstart.py", "--config.input.batch_size=12"],
              "error: input.batch_size=12 is not divisible by the 8 devices; use a multiple "
              "of 8 (e.g. 8, 16, 32"),
    "variant": (["--config=configs/pvt_v2.py:b9"],
                "error: unknown PVTv2 variant 'b9' (did you mean: b5, b4, b3?); choose from b0"),
    "value": (["--config=configs/quickstart.py", "--config.total_steps=ten"],
              "error: flag --config.total_steps=ten: invalid literal for int()"),
}


def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
  procs = {name: subprocess.Popen(train_py(*args, f"--workdir={tmp_path / name}"), cwd=ROOT,
                                  env=env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
           for name, (args, _) in ERRORS.items()}   # in parallel: mostly TensorFlow's import
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, (name, err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(ERRORS[name][1]), (name, lines[-1])
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err
    assert not (tmp_path / name).exists()


CACHED_STEP = """
import json, sys
import jax
from effvit import cli
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)

def main(config, workdir):
  from effvit.benchmark_utils import EffvitRunner, model_for
  runner = EffvitRunner(model_for("pvt_v2_b0", {}, 32), 2, 32)
  runner.state, metrics = runner.compiled["train"](runner.state, runner._batch)
  print(json.dumps({"loss": float(metrics["loss"]), "hits": len(hits),
                    "dir": jax.config.jax_compilation_cache_dir}))

cli.run(main, ["train.py"], require_config=False)
"""


def test_a_second_process_loads_the_compiled_steps(tmp_path):
  """cli.run turns on jax's persistent compilation cache (EFFVIT_COMPILATION_CACHE): a second
  run of the same steps loads them, C++ kernel calls included, and computes the same loss."""
  cache = tmp_path / "jax-cache"
  run_env = {**env(1), "EFFVIT_COMPILATION_CACHE": str(cache),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}   # this tiny model compiles fast
  runs = []
  for _ in range(2):
    out = subprocess.run([sys.executable, "-c", CACHED_STEP], cwd=ROOT, env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  assert runs[0]["dir"] == str(cache) and any(cache.iterdir())
  assert runs[0]["hits"] == 0 and runs[1]["hits"] >= 3   # init, inference and train steps
  assert runs[1]["loss"] == runs[0]["loss"]

  off = subprocess.run([sys.executable, "-c", CACHED_STEP], cwd=ROOT,
                       env={**run_env, "EFFVIT_COMPILATION_CACHE": "0"},
                       capture_output=True, text=True, timeout=300)
  assert off.returncode == 0, off.stderr[-3000:]
  assert json.loads(off.stdout.strip().splitlines()[-1])["hits"] == 0


def test_an_unwritable_cache_directory_warns_once_and_compiles(tmp_path, monkeypatch, caplog):
  import jax
  from effvit import cli
  (tmp_path / "file").write_text("")
  monkeypatch.setenv("EFFVIT_COMPILATION_CACHE", str(tmp_path / "file" / "cache"))
  before = jax.config.jax_compilation_cache_dir
  with caplog.at_level("WARNING"):
    assert cli.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == before
  assert [r.getMessage() for r in caplog.records] == [
      f"compiled steps are not cached ([Errno 20] Not a directory: "
      f"'{tmp_path / 'file' / 'cache'}'); set EFFVIT_COMPILATION_CACHE to a writable directory, "
      "or to 0"]
