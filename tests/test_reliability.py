"""Reliability (issue 8): the guarantees of the training loop, each as a fast test.

Requirement -> test here (and the tests elsewhere that cover the rest of it):
1. Exact resume after SIGKILL: test_sigkill_at_a_random_step_resumes_bit_identically (train.py
   killed at a random step, re-run with the same command, final state bit-identical to an
   uninterrupted run). The data order is a pure function of (seed, step):
   test_data.py::test_train_order_is_a_function_of_seed_and_step (start_step resumes the
   stream) and test_global_batches_do_not_depend_on_the_process_count; the step's randomness is
   fold_in(seed, state.step) (effvit/train/state.py), so it is restored with the state.
   Five kills in one quickstart run: tools/kill_resume.py. SIGTERM saves and exits:
   test_train_cli.py::test_sigterm_saves_and_rerun_resumes_on_another_device_count.
2. Damaged checkpoints: test_damaged_checkpoints_are_moved_aside_and_the_newest_good_one_resumes
   (truncated array files and a garbage metadata file; in-process, stderr checked).
3. Non-finite loss / gradient: test_nonfinite_loss_or_gradient_stops_naming_step_and_quantity
   (exit status 3 through effvit.cli), test_nonfinite_skip_drops_the_steps_and_counts_them.
4. Bad input: test_bad_input_is_one_line_exit_2_and_writes_nothing runs every kind through
   effvit.cli.run in-process; the exit status in a real process:
   test_train_cli.py::test_user_errors_are_one_line_exit_2_and_write_nothing. More model
   errors: test_model_errors.py; bad configs and files in-process: test_train.py
   (test_bad_config_fails_before_anything_is_written, test_weights_of_another_model_...,
   test_workdir_of_another_run_is_refused_untouched, test_checkpoint_of_another_train_state_...).
5. Devices: test_one_and_eight_devices_data_parallel_and_fsdp_agree_over_20_steps,
   test_checkpoints_move_between_8_4_and_1_devices (also test_train.py::
   test_model_init_ema_mixup_and_metrics_on_8_devices: 6 steps with model_init, EMA, mixup).
6. Processes: test_two_processes_match_one_process_with_eight_devices (two train.py processes
   joined by jax.distributed over loopback, 4 CPU devices each).

Every run is the same 20 steps: configs/quickstart.py with one small stage, on the digits at
32 px. The train.py processes (an uninterrupted 8-device run, the reference of 1, 5 and 6; the
killed run and its re-run; the two processes) start with this module's first test and run
beside the in-process ones. They compile with XLA's backend optimisation off, as
test_train_cli.py does: bit-identity is only asked of runs made with the same flags.
"""
import dataclasses
import functools
import glob
import inspect
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

# One worker runs this whole module (pyproject: --dist loadgroup): each worker that ran any of
# its tests would start the train.py processes of its own, on a machine of two cores.
pytestmark = pytest.mark.xdist_group("train_processes")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the configs package

import train  # noqa: E402
from configs import quickstart  # noqa: E402
from run_helpers import assert_trees_close, assert_trees_equal, host  # noqa: E402
from effvit import cli, convert  # noqa: E402
from effvit.data import pipeline  # noqa: E402
from effvit.models import create_model  # noqa: E402
from effvit.train import checkpoint, loop, sharding  # noqa: E402

# quickstart's recipe with one small stage: every Trainer compiles its own step.
MODEL = dict(embed_dims=(16,), depths=(1,), num_heads=(1,), mlp_ratios=(4,), sr_ratios=(2,),
             patch_strides=(4,), mixers=("sra",), windows=(7,), pool_sizes=(7,), va_layers=(1,))
STEPS, EVERY = 20, 4   # steps of every run; a checkpoint every 4
RUN = dict(total_steps=STEPS, log_every_steps=1, checkpoint_every_steps=EVERY,
           eval_every_steps=0, keep_checkpoints=10)
CONFIG_FILE = f'''"""tests/test_reliability.py's run: configs/quickstart.py, one stage, no evals."""
import ml_collections
from configs import quickstart


def get_config(arg=None):
  c = quickstart.get_config(arg)
  c.model.update({MODEL!r})
  c.input.batch_size = 16
  c.evals = ml_collections.ConfigDict()
  c.update({RUN!r})
  return c
'''


def tiny_config(data_dir):
  """CONFIG_FILE's config, in-process."""
  c = quickstart.get_config()
  c.model.update(MODEL)
  c.input.update(data_dir=data_dir, batch_size=16)
  c.evals = ml_collections.ConfigDict()
  c.update(RUN)
  return c


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  pipeline.load_builder("sklearn_digits", path)   # prepares on first use
  return path


def records(workdir):
  path = pathlib.Path(workdir, "metrics.jsonl")
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(workdir):
  return np.array([r["train/loss"] for r in records(workdir)])


def steps_saved(workdir):
  path = pathlib.Path(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if path.is_dir() else []


def saved_state(workdir, step):
  """The train state of a checkpoint as numpy arrays, whatever topology wrote it."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as c:
    meta = c.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


# ---------------------------------------------------------------------- train.py processes

def gloo_available() -> bool:
  from jax._src import lib
  module = getattr(lib, "_jax", None) or getattr(lib.xla_client, "_xla", None)
  return hasattr(module, "make_gloo_tcp_collectives")


class Processes:
  """train.py runs, started together and left to run in the background: an uninterrupted run
  on 8 devices (the reference), a run SIGKILLed at a random step and then re-run with the same
  command (a thread does both), and two processes of 4 devices joined by jax.distributed."""

  def __init__(self, root: pathlib.Path, data_dir: str):
    self.root, self.data_dir = root, data_dir
    self.config = root / "tiny_config.py"
    self.config.write_text(CONFIG_FILE)
    self.procs: dict[str, subprocess.Popen] = {}
    self.lock, self.stopped = threading.Lock(), False   # the killer thread starts processes too
    self.start("reference", 8)
    if gloo_available():
      with socket.socket() as s:   # a free port on loopback for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
      for i in range(2):
        self.start(f"process{i}", 4, workdir="multi", args=(
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"))
    self.kill_step = random.randrange(EVERY + 1, STEPS - 2)
    self.killed: dict = {}
    self.killer = threading.Thread(target=self._kill_and_rerun, daemon=True)
    self.killer.start()

  def workdir(self, name: str) -> pathlib.Path:
    return self.root / name

  def start(self, name, devices, workdir=None, args=()) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0"}
    command = [sys.executable, "train.py", f"--config={self.config}",
               f"--workdir={self.workdir(workdir or name)}",
               f"--config.input.data_dir={self.data_dir}", *args]
    with self.lock, open(self.root / f"{name}.log", "w") as log:   # a file: no pipe to fill
      if self.stopped:
        raise RuntimeError(f"{name} not started: the module's tests have ended")
      self.procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT)
    return self.procs[name]

  def log(self, name: str) -> str:
    return (self.root / f"{name}.log").read_text()

  def wait(self, name: str, timeout: float = 600) -> int:
    return self.procs[name].wait(timeout)

  def _kill_and_rerun(self):
    workdir = self.workdir("killed")
    try:
      victim = self.start("killed", 8)
      deadline = time.time() + 600
      # The random step, once a checkpoint is committed (so the re-run resumes from one).
      while victim.poll() is None and time.time() < deadline:
        logged = [r["step"] for r in records(workdir)]
        if logged and logged[-1] >= self.kill_step and steps_saved(workdir):
          break
        time.sleep(0.02)
      self.killed["alive"] = victim.poll() is None
      os.kill(victim.pid, signal.SIGKILL)
      self.killed["returncode"] = victim.wait()
      self.killed["at"] = [r["step"] for r in records(workdir)][-1]
      self.killed["rerun"] = self.start("rerun", 8, workdir="killed").wait(600)
    except Exception as e:  # reported by the test
      self.killed["error"] = repr(e)

  def stop(self):
    with self.lock:
      self.stopped = True
    for p in self.procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module", autouse=True)
def processes(request, digits_dir, tmp_path_factory):
  """Starts the train.py runs with the module's first test, when a test that needs them is
  selected, so that they run while the in-process tests do."""
  if not any("processes" in inspect.signature(item.obj).parameters
             for item in request.session.items if item.module is request.module):
    yield None
    return
  runs = Processes(tmp_path_factory.mktemp("processes"), digits_dir)
  yield runs
  runs.stop()


def reference(processes) -> pathlib.Path:
  """The uninterrupted 8-device train.py run, once it has finished."""
  assert processes.wait("reference") == 0, processes.log("reference")[-3000:]
  return processes.workdir("reference")


# ----------------------------------------------------------------- the data order (1 and 6)

def test_global_batches_do_not_depend_on_the_process_count(digits_dir):
  """Two processes' blocks of every global batch (augmentation included), resumed at a step
  whose batches cross the end of an epoch, are the rows of one process's batches."""
  cfg = tiny_config(digits_dir).input
  def batches(index, count, n=2):
    it = pipeline.train_iterator(cfg, local_batch_size=16 // count, seed=3, start_step=93,
                                 process_index=index, process_count=count)
    return [next(it) for _ in range(n)]   # steps 93 and 94: 1500 examples an epoch

  one, halves = batches(0, 1), [batches(i, 2) for i in range(2)]
  for k, batch in enumerate(one):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][k][key], halves[1][k][key]]), batch[key])


# ------------------------------------------------------------------- devices (5) and (2)

Run = dataclasses.make_dataclass("Run", ["trainer", "workdir", "losses", "final"])


def straight_run(digits_dir, workdir, devices, mesh) -> Run:
  """The reference's 20 steps in-process: the trainer, its losses and final state."""
  c = tiny_config(digits_dir)
  c.mesh.update(mesh)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(sharding, "MIN_FSDP_SIZE", 512)   # the tiny model's arrays: split them too
    trainer = loop.Trainer(loop.validate(c, str(workdir), devices))
  trainer.run()
  return Run(trainer, workdir, losses(workdir), host(trainer.state))


@pytest.fixture(scope="module")
def one_device(digits_dir, tmp_path_factory):
  return straight_run(digits_dir, tmp_path_factory.mktemp("one") / "run", jax.devices()[:1],
                      dict(data=-1, fsdp=1))


@pytest.fixture(scope="module")
def fsdp(digits_dir, tmp_path_factory):
  return straight_run(digits_dir, tmp_path_factory.mktemp("fsdp") / "run", jax.devices(),
                      dict(data=1, fsdp=-1))


def rerun_in(trainer, workdir):
  """The trainer's run (compiled already) in another workdir."""
  trainer.plan = dataclasses.replace(trainer.plan, workdir=str(workdir))
  return trainer.run()


def test_one_and_eight_devices_data_parallel_and_fsdp_agree_over_20_steps(one_device, fsdp,
                                                                          processes):
  """8 devices data parallel (the train.py reference), 8 devices FSDP and 1 device."""
  dp8 = reference(processes)
  expected = losses(dp8)
  assert len(expected) == STEPS and np.isfinite(expected).all()
  assert expected[-5:].mean() < expected[:5].mean()   # it trains
  for run in (fsdp, one_device):
    np.testing.assert_allclose(run.losses, expected, rtol=2e-5)
    assert_trees_close(run.final.params, saved_state(dp8, STEPS)["params"], rtol=2e-4,
                       atol=1e-6)
  assert "8 devices {'data': 8, 'fsdp': 1}" in processes.log("reference")
  assert fsdp.trainer.plan.mesh.shape == {"data": 1, "fsdp": 8}
  assert one_device.trainer.plan.mesh.size == 1
  specs = [x.sharding.spec for x in jax.tree.leaves(fsdp.trainer.state.params)]
  assert any("fsdp" in s for s in specs)   # some parameters really are split over 8 devices


def test_checkpoints_move_between_8_4_and_1_devices(one_device, processes, tmp_path):
  """8 -> 1: one device resumes the 8-device run at step 8 and ends where it ends. 8 -> 4 -> 1
  and 1 -> 8: restored exactly, whatever mesh wrote the checkpoint."""
  dp8 = reference(processes)
  one = one_device.trainer
  shutil.copytree(dp8 / "checkpoints" / "8", tmp_path / "resumed" / "checkpoints" / "8")
  rerun_in(one, tmp_path / "resumed")
  np.testing.assert_allclose(losses(tmp_path / "resumed"), losses(dp8)[8:], rtol=2e-5)
  assert_trees_close(host(one.state.params), saved_state(dp8, STEPS)["params"], rtol=2e-4,
                     atol=1e-6)

  config = one.config
  four, eight = (loop.Trainer(loop.validate(config, str(tmp_path / "unused"), jax.devices()[:n]))
                 for n in (4, 8))   # their abstract states only: nothing compiles
  on4 = checkpoint.Checkpointer(str(dp8)).restore(four.abstract_state, step=STEPS)[0]
  assert len(on4.params["head"]["kernel"].sharding.device_set) == 4
  ckpt = checkpoint.Checkpointer(str(tmp_path / "four"), asynchronous=False)
  ckpt.save(STEPS, on4, four.meta(STEPS))
  ckpt.close()
  on1 = checkpoint.Checkpointer(str(tmp_path / "four")).restore(one.abstract_state)[0]
  assert len(on1.params["head"]["kernel"].sharding.device_set) == 1
  assert_trees_equal(serialization.to_state_dict(host(on1)), saved_state(dp8, STEPS))
  on8 = checkpoint.Checkpointer(str(tmp_path / "resumed")).restore(eight.abstract_state)[0]
  assert len(on8.params["head"]["kernel"].sharding.device_set) == 8
  assert_trees_equal(host(on8), host(one.state))


def test_saving_a_replicated_state_compiles_nothing(tmp_path, caplog):
  """Replicated arrays are written from one replica: no per-shape, per-device slicing ops
  compiled on the first save (orbax's replica-parallel default took 7.8 s on 8 CPU devices
  for pvt_v2_b0's state). What was saved restores onto 1 device unchanged."""
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  rng = np.random.default_rng(0)
  state = {f"w{i}": jax.device_put(rng.standard_normal(shape).astype(np.float32),
                                   jax.sharding.NamedSharding(mesh, jax.P()))
           for i, shape in enumerate([(3, 3, 16, 32), (40,), (64, 24), (7, 7, 3, 8)])}
  ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
  with jax.log_compiles(), caplog.at_level("WARNING"):
    ckpt.save(1, state, {"step": 1})
  ckpt.close()
  assert not [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one) for k, v in state.items()}
  restored = checkpoint.Checkpointer(str(tmp_path)).restore(abstract)[0]
  assert_trees_equal(host(restored), host(state))


def test_damaged_checkpoints_are_moved_aside_and_the_newest_good_one_resumes(
    one_device, tmp_path, caplog, capfd):
  """Step 20's array files cut in half and step 16's metadata replaced by garbage: the re-run
  names both steps, moves them to checkpoints/corrupt-*, resumes at step 12 (deleting none of
  the good ones) and ends bit-identical to the undamaged run, with no traceback on stderr."""
  one = one_device.trainer
  workdir = tmp_path / "run"
  shutil.copytree(one_device.workdir, workdir)
  ckpts = workdir / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["12", "16", "20", "4", "8"]
  arrays = glob.glob(str(ckpts / "20" / "state" / "**" / "d" / "*"), recursive=True)
  assert arrays
  for f in arrays:
    os.truncate(f, os.path.getsize(f) // 2)
  (ckpts / "16" / "meta" / "metadata").write_text("\x00{garbage")
  good = {s: saved_state(workdir, s) for s in (4, 8, 12)}

  capfd.readouterr()
  with caplog.at_level("INFO", logger="effvit"):
    rerun_in(one, workdir)
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop" not in err, err[-3000:]
  warnings = [r.getMessage() for r in caplog.records
              if r.name == "effvit" and r.levelname == "WARNING"]
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith("checkpoint at step 20 is unreadable (")
  assert warnings[1].startswith("checkpoint at step 16 is unreadable (")
  assert all("falling back to an older one" in w for w in warnings)
  assert "resumed from checkpoint at step 12" in caplog.text

  moved = {int(d.split("-")[1]): ckpts / d for d in os.listdir(ckpts) if d.startswith("corrupt-")}
  assert sorted(moved) == [16, 20]
  assert (moved[16] / "meta" / "metadata").read_text() == "\x00{garbage"
  for f in arrays:   # the cut files, kept for a post-mortem
    assert (moved[20] / os.path.relpath(f, ckpts / "20")).is_file()
  assert steps_saved(workdir) == [4, 8, 12, 16, 20]
  for s, state in good.items():   # the good ones are untouched
    assert_trees_equal(saved_state(workdir, s), state)
  assert_trees_equal(host(one.state), one_device.final)
  np.testing.assert_array_equal(losses(workdir), one_device.losses)


def test_orphaned_orbax_reads_are_not_reported_other_tasks_are(caplog):
  """The reads orbax leaves behind when a damaged checkpoint fails end in asyncio's "Task
  exception was never retrieved" (with a traceback): those are dropped, anyone else's kept."""
  import asyncio
  import gc
  from effvit.train import checkpoint
  checkpoint._drop_orphaned_read_reports()
  coroutines = {}
  for path, msg in (("/site-packages/orbax/checkpoint/read.py", "OUT_OF_RANGE cut file"),
                    ("/work/mine.py", "my own failure")):
    ns = {}
    exec(compile(f"async def read():\n  raise ValueError({msg!r})\n", path, "exec"), ns)
    coroutines[msg] = ns["read"]

  async def main():
    tasks = [asyncio.ensure_future(read()) for read in coroutines.values()]
    await asyncio.sleep(0.01)
    del tasks

  with caplog.at_level("ERROR", logger="asyncio"):
    asyncio.run(main())
    gc.collect()
  assert "my own failure" in caplog.text and "OUT_OF_RANGE" not in caplog.text


# ------------------------------------------------------------------------------ non-finite (3)

POISON: dict[int, str] = {}   # step -> "loss" | "grad": what goes non-finite at that step


@jax.custom_vjp
def scale_gradient(x, scale):
  return x


scale_gradient.defvjp(lambda x, scale: (x, scale),
                      lambda scale, g: (g * scale, jnp.zeros_like(scale)))


class GradientPoison:
  """The model, with the gradient of its logits multiplied by `scale` (inf: a non-finite
  gradient under a finite loss)."""

  def __init__(self, model, scale):
    self.model, self.scale = model, scale

  def apply(self, *args, **kwargs):
    logits, mutated = self.model.apply(*args, **kwargs)
    return scale_gradient(logits, self.scale), mutated


def poisoned_iterator(real):
  """The train batches, each with a `poison` code for its step (from POISON)."""
  def train_iterator(cfg, *, local_batch_size, start_step=0, **kwargs):
    it = real(cfg, local_batch_size=local_batch_size, start_step=start_step, **kwargs)
    for step, batch in enumerate(it, start_step + 1):
      code = {"loss": 1, "grad": 2}.get(POISON.get(step), 0)
      yield {**batch, "poison": np.full(local_batch_size, code, np.int32)}
  return train_iterator


def poisoned_step(real):
  """train_step, making the loss (NaN images) or the gradient (inf) non-finite on request."""
  def train_step(state, batch, *, model, **kwargs):
    code = batch["poison"][0]
    batch = {"image": jnp.where(code == 1, jnp.nan, batch["image"]), "label": batch["label"]}
    model = GradientPoison(model, jnp.where(code == 2, jnp.inf, 1.0))
    return real(state, batch, model=model, **kwargs)
  return train_step


@pytest.fixture(scope="module")
def poisoned(one_device):
  """A 1-device trainer of 10 steps whose steps go non-finite where POISON says, checkpointing
  every 2; it starts from one_device's checkpoint 4 (saving the compilation of its init)."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(loop, "train_step", poisoned_step(loop.train_step))
    m.setattr(pipeline, "train_iterator", poisoned_iterator(pipeline.train_iterator))
    c = one_device.trainer.config.copy_and_resolve_references()
    c.update(total_steps=10, checkpoint_every_steps=2)
    yield loop.Trainer(dataclasses.replace(one_device.trainer.plan, config=c, total_steps=10))


def start_at_4(trainer, one_device, workdir):
  shutil.copytree(one_device.workdir / "checkpoints" / "4", workdir / "checkpoints" / "4")
  trainer.plan = dataclasses.replace(trainer.plan, workdir=str(workdir))


def exit_through_cli(error, capsys):
  """(exit status, stderr lines) of train.py when training raises `error`."""
  def main(config, workdir):
    raise error
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.run(main, ["train.py", "--config=configs/quickstart.py", "--workdir=/nonexistent"])
  return e.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_nonfinite_loss_or_gradient_stops_naming_step_and_quantity(
    poisoned, one_device, tmp_path, capsys, restore_logging):
  """A NaN loss at step 7 stops the run there: the error names the step and the loss, exits
  with status 3 through the CLI, and the last checkpoint (step 6) is intact. Re-run, it
  resumes at step 6, and a non-finite gradient norm at step 7 stops it again and says so."""
  start_at_4(poisoned, one_device, tmp_path)
  POISON.clear()
  POISON[7] = "loss"
  with pytest.raises(loop.NonFiniteError) as e:
    poisoned.run()
  message = str(e.value)
  assert message.startswith("non-finite loss at step 7; the update was not applied")
  assert "Last checkpoint: step 6 (intact)" in message and "--config.nonfinite=skip" in message
  status, lines = exit_through_cli(e.value, capsys)
  assert status == 3 and lines == [f"error: {message}"]

  assert steps_saved(tmp_path) == [4, 6]
  last = saved_state(tmp_path, 6)
  assert last["step"] == 6 and last["nonfinite_count"] == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(last["params"]))
  assert [r["step"] for r in records(tmp_path)] == [5, 6]

  POISON[7] = "grad"
  with pytest.raises(loop.NonFiniteError) as e:
    poisoned.run()
  assert str(e.value).startswith("non-finite gradient norm at step 7;")
  assert steps_saved(tmp_path) == [4, 6]
  assert_trees_equal(saved_state(tmp_path, 6), last)


def test_nonfinite_skip_drops_the_steps_and_counts_them(poisoned, one_device, tmp_path):
  """With nonfinite=skip the bad steps change nothing and are counted in the metrics."""
  start_at_4(poisoned, one_device, tmp_path)
  POISON.clear()
  POISON.update({7: "loss", 8: "grad"})
  poisoned.config.nonfinite = "skip"
  try:
    result = poisoned.run()
  finally:
    poisoned.config.nonfinite = "stop"
  logged = {r["step"]: r for r in records(tmp_path)}
  assert [logged[s]["train/nonfinite_steps"] for s in range(5, 11)] == [0, 0, 1, 2, 2, 2]
  assert np.isnan(logged[7]["train/loss"]) and np.isfinite(logged[8]["train/loss"])
  assert not np.isfinite(logged[8]["train/grad_norm"])
  assert result["train/nonfinite_steps"] == 2 and np.isfinite(result["train/loss"])
  state = host(poisoned.state)
  assert state.step == 10 and state.nonfinite_count == 2
  assert list(state.first_nonfinite) == [6, 1]   # step index 6 (the 7th step), the loss
  # Steps 7 and 8 were dropped: the state after them is the state after step 6.
  after6, after8 = saved_state(tmp_path, 6), saved_state(tmp_path, 8)
  assert_trees_equal(after8["params"], after6["params"])
  assert_trees_equal(after8["opt_state"], after6["opt_state"])
  assert after8["step"] == 8


def test_nonfinite_step_keeps_moments_ema_and_batch_stats():
  """train_step's skip, on a model with BatchNorm and EMA: a NaN batch leaves params, both
  Adam moments, the EMA and the running statistics exactly as they were; a finite one moves
  them all."""
  import flax.linen as nn
  import optax
  from effvit.layers import BatchNorm
  from effvit.train.state import create_state, train_step

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(5)(BatchNorm()(x.reshape(x.shape[0], -1), train))

  model, tx = Tiny(), optax.adamw(1e-2)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx, base_rng=jax.random.key(1),
                                   num_classes=5, mixup={}, aux_weights={}, ema_decay=0.9))
  images = jax.random.normal(jax.random.key(2), (4, 2, 2, 3))
  batch = {"image": images, "label": jnp.arange(4) % 5}
  state0 = create_state(model, tx, jax.random.key(0), (1, 2, 2, 3), ema=True)
  state1, _ = step(state0, batch)
  kept = ("params", "opt_state", "ema_params", "batch_stats")
  for field in kept:
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                         getattr(state1, field), getattr(state0, field)))
    assert any(moved), field
  state2, metrics = step(state1, {**batch, "image": images.at[0, 0, 0, 0].set(jnp.nan)})
  assert np.isnan(metrics["loss"])
  for field in kept:
    assert_trees_equal(getattr(state2, field), getattr(state1, field))
  assert int(state2.step) == 2 and int(state2.nonfinite_count) == 1


# ------------------------------------------------------------------------------ bad input (4)

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A file that is not a weights file, and the weights of a wider quickstart model."""
  from safetensors.numpy import save_file
  path = tmp_path_factory.mktemp("weights")
  (path / "garbage.safetensors").write_bytes(b"\x00" * 64)
  fields = dict(quickstart.get_config().model)
  model = create_model("pvt_v2_b0", **dict(fields, embed_dims=(16, 64, 128, 128)))
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                           convert.abstract_variables(model, 32))
  save_file(convert.to_torch_state_dict("pvt_v2_b0", variables), str(path / "wider.safetensors"))
  return path


# kind -> (train.py arguments, what the one line must say)
BAD_INPUT = {
    "unknown model": (["--config.model_name=pvt_v2_b9"],
                      "unknown model 'pvt_v2_b9' (did you mean: pvt_v2_b5"),
    "unknown dataset": (["--config.input.dataset=sklearn_digit"],
                        "unknown dataset 'sklearn_digit' (did you mean: sklearn_digits"),
    "unknown override field": (["--config.optimizer.base_lrr=0.1"],
                               "unknown config field 'optimizer.base_lrr': optimizer has no "
                               "'base_lrr' (did you mean: base_lr?)"),
    "wrong override type": (["--config.optimizer.base_lr=fast"],
                            "flag --config.optimizer.base_lr=fast: could not convert string to "
                            "float"),
    "reduction ratio <= 0": (["--config.model.sr_ratios=4,2,0,1"],
                             "sr_ratios[2]=0 must be a positive integer"),
    "reduction ratio > map": (["--config.model.sr_ratios=32,2,1,1"],
                              "a 16x16 token map is smaller than sr_ratio=32: use a larger input "
                              "or a smaller sr_ratio"),
    "heads not dividing": (["--config.model.num_heads=3,2,4,4"],
                           "embed_dims[0]=32 must be divisible by num_heads[0]=3"),
    "window <= 0": (["--config.model.mixers=lsa/sra,sra,sra,sra",
                     "--config.model.windows=0,7,7,7"], "windows[0]=0 must be a positive integer"),
    "per-stage lengths": (["--config.model.depths=1,1,1"],
                          "one value per stage, got lengths embed_dims=4, depths=3"),
    "resolution too small": (["--config.model.overlap_patch_embed=False",
                              "--config.input.image_size=8"],
                             "input 8x8 is too small for this model: non-overlapping patch "
                             "embeddings with strides (2, 2, 2, 2) need H and W >= 16"),
    "image size 0": (["--config.input.image_size=0"], "input.image_size=0 must be >= 1"),
    "unknown dtype": (["--config.model.dtype=float8"],
                      "unknown dtype 'float8' (did you mean: float32"),
    "batch not divisible": (["--config.input.batch_size=12"],
                            "input.batch_size=12 is not divisible by the 8 devices; use a "
                            "multiple of 8"),
    "workdir of another model": ([], "holds a run of pvt_v1_tiny, not pvt_v2_b0: use another "
                                     "--workdir"),
    "unreadable model_init": (["--config.model_init={weights}/garbage.safetensors"],
                              "cannot read weights file '{weights}/garbage.safetensors': "
                              "SafetensorError"),
    "model_init of other shapes": (["--config.model_init={weights}/wider.safetensors"],
                                   "does not fit pvt_v2_b0"),
    "missing dataset": (["--config.input.dataset=mnist"],
                        "dataset mnist is not prepared in {data}: run `python -m "
                        "effvit.data.prepare mnist --data_dir={data}`"),
    "negative learning rate": (["--config.optimizer.base_lr=-0.001"],
                               "optimizer.base_lr=-0.001 must be >= 0"),
    "negative step count": (["--config.total_steps=-5"], "total_steps=-5 must be >= 0"),
    "missing config file": (["--config=configs/quickstrat.py"],
                            "config file 'configs/quickstrat.py' not found"),
}


def snapshot(directory):
  return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns)
                for p in pathlib.Path(directory).rglob("*"))


@pytest.mark.parametrize("kind", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(kind, digits_dir, weights, tmp_path,
                                                         capsys, restore_logging):
  args, expected = BAD_INPUT[kind]
  fill = lambda text: text.format(weights=weights, data=digits_dir)
  workdir = tmp_path / "run"
  if kind == "workdir of another model":
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model_name": "pvt_v1_tiny", "model": {}}))
  before = snapshot(tmp_path)
  argv = ["train.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
          f"--config.input.data_dir={digits_dir}", f"--config.evals.test.data_dir={digits_dir}",
          *map(fill, args)]
  cwd = os.getcwd()
  os.chdir(ROOT)   # train.py's relative --config paths
  try:
    with pytest.raises(SystemExit) as e:
      cli.run(train.main, argv)
  finally:
    os.chdir(cwd)
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert e.value.code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("error: ") and fill(expected) in lines[0], lines[0]
  assert snapshot(tmp_path) == before   # nothing written


# ------------------------------------------------------------ train.py processes (1 and 6)

def test_sigkill_at_a_random_step_resumes_bit_identically(processes):
  """SIGKILL at a random step (during training, possibly mid-save), then the same command
  again: the final train state and every logged loss equal those of the uninterrupted run."""
  processes.killer.join(900)
  killed = processes.killed
  assert "error" not in killed and "rerun" in killed, killed
  assert killed["alive"] and killed["returncode"] == -signal.SIGKILL, killed
  assert killed["rerun"] == 0, processes.log("rerun")[-3000:]
  at = killed["at"]
  assert processes.kill_step <= at < STEPS, killed
  resumed = [int(line.split("resumed from checkpoint at step ")[1].split()[0])
             for line in processes.log("rerun").splitlines() if "resumed from checkpoint" in line]
  assert len(resumed) == 1 and EVERY <= resumed[0] <= at, (resumed, at)

  expected, workdir = reference(processes), processes.workdir("killed")
  assert_trees_equal(saved_state(workdir, STEPS), saved_state(expected, STEPS))
  assert [r["step"] for r in records(workdir)] == list(range(1, STEPS + 1))
  np.testing.assert_array_equal(losses(workdir), losses(expected))


def test_two_processes_match_one_process_with_eight_devices(processes):
  """Two processes x 4 CPU devices, each loading its half of every global batch: the losses
  and final parameters of one process with 8 devices; only process 0 writes the logs."""
  if not gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)")
  for i in range(2):
    assert processes.wait(f"process{i}") == 0, processes.log(f"process{i}")[-3000:]
  expected, multi = reference(processes), processes.workdir("multi")
  logs = [processes.log(f"process{i}") for i in range(2)]
  for log in logs:
    assert "8 devices {'data': 8, 'fsdp': 1}, global batch 16 (8 per host)" in log
  np.testing.assert_allclose(losses(multi), losses(expected), rtol=1e-5)
  assert_trees_close(saved_state(multi, STEPS)["params"], saved_state(expected, STEPS)["params"],
                     rtol=1e-4, atol=1e-6)
  # Process 0 alone writes the metrics (one record per step), TensorBoard and the progress bar.
  assert [r["step"] for r in records(multi)] == list(range(1, STEPS + 1))
  assert len(glob.glob(str(multi / "events.out.tfevents*"))) == 1
  assert f"step {STEPS}/{STEPS}" in logs[0] and f"step {STEPS}/{STEPS}" not in logs[1]
