"""The training loop: `train_and_evaluate(config, workdir)`.

Order of work: validate everything that can be wrong (model, dataset, mesh, batch sizes,
workdir, model_init) before the first byte is written; then build the sharded state under jit,
resume from the newest readable checkpoint in the workdir (or start from `model_init`), and
loop. Re-running the same command resumes; SIGTERM / SIGINT save a checkpoint and exit.
Each log step writes one record (train metrics, and the evaluations of that step) to
TensorBoard and metrics.jsonl; the run ends with an evaluation and returns the last record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from jax.experimental import multihost_utils
from tqdm.contrib.logging import logging_redirect_tqdm

from effvit import convert, profile
from effvit.data import pipeline
from effvit.errors import ConfigError, EffvitError
from effvit.evaluate import Evaluator, make_evaluators
from effvit.models import compute_dtype, create_model
from effvit.train import checkpoint, optimizer, sharding
from effvit.train.metrics import create_writer
from effvit.train.state import NONFINITE_LOSS, TrainState, create_state, train_step
from effvit.xla_cpu import compiler_options

log = logging.getLogger("effvit")


class NonFiniteError(EffvitError):
  """Training produced a non-finite loss or gradient (config.nonfinite = "stop")."""
  exit_code = 3


@dataclasses.dataclass
class Plan:
  """Everything validated before anything is written."""
  config: ml_collections.ConfigDict
  workdir: str
  model: Any
  mesh: Any
  num_classes: int
  num_train_examples: int
  total_steps: int
  steps_per_epoch: float
  local_batch: int
  image_shape: tuple[int, ...]
  evaluators: list[Evaluator]
  data_block: int = 0   # the block of each global batch this process loads (process_block)
  # config.model_init converted (host arrays); heads to re-initialise are ShapeDtypeStructs.
  init_variables: dict | None = None


# Canonical PyTorch keys of the classifier heads, re-initialised by model_init where their
# shape differs (fine-tuning to another number of classes).
HEAD_KEYS = (r"^(head|fc)\.",)


def validate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Plan:
  """Every check that needs no training; raises EffvitError. `devices`: default all."""
  if not workdir:
    raise ConfigError("--workdir is required")
  if config.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"nonfinite={config.nonfinite!r}: choose 'stop' or 'skip'")
  for key in ("total_steps", "num_train_examples", "log_every_steps", "checkpoint_every_steps",
              "eval_every_steps", "keep_checkpoints"):
    if config[key] < 0:
      raise ConfigError(f"{key}={config[key]} must be >= 0")
  for key, value in (("total_epochs", config.total_epochs),
                     ("optimizer.base_lr", config.optimizer.base_lr)):
    if value < 0:
      raise ConfigError(f"{key}={value} must be >= 0")
  for key, e in (("input", config.input), *((f"evals.{k}", v) for k, v in config.evals.items())):
    if e.image_size < 1:
      raise ConfigError(f"{key}.image_size={e.image_size} must be >= 1")
  if config.optimizer.accum_steps < 1:
    raise ConfigError(f"optimizer.accum_steps={config.optimizer.accum_steps} must be >= 1")
  if not 0 <= config.optimizer.ema_decay < 1:
    raise ConfigError(f"optimizer.ema_decay={config.optimizer.ema_decay} must be in [0, 1)")
  model = create_model(config.model_name, **config.model)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.input.batch_size, mesh, "input.batch_size")
  data_block = sharding.process_block(sharding.batch_sharding(mesh), config.input.batch_size)
  pipeline.check_input_config(config.input)
  for name, e in config.evals.items():
    sharding.check_batch_size(e.batch_size, mesh, f"evals.{name}.batch_size")
  num_classes, n_train = pipeline.dataset_info(config.input.dataset, config.input.split,
                                               config.input.get("data_dir"))
  if num_classes != config.model.num_classes:
    raise ConfigError(f"{config.input.dataset} has {num_classes} classes but "
                      f"model.num_classes={config.model.num_classes}; set "
                      f"--config.model.num_classes={num_classes}")
  n_train = config.num_train_examples or n_train
  steps_per_epoch = n_train / config.input.batch_size
  total = config.total_steps or int(math.ceil(config.total_epochs * steps_per_epoch))
  image_shape = (1, config.input.image_size, config.input.image_size, 3)
  # Trace the model at the training and evaluation sizes: size constraints (LaViT's fixed
  # token counts, windows, reduction ratios) fail here, not after hours of training.
  init = lambda x: model.init(jax.random.key(0), x)
  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct(image_shape, jnp.float32))
  for e in config.evals.values():
    jax.eval_shape(init, jax.ShapeDtypeStruct((1, e.image_size, e.image_size, 3), jnp.float32))
  evaluators = make_evaluators(config, model, mesh)
  check_workdir(config, workdir)
  init_variables = None
  if config.model_init:   # read and converted once, here: keys and shapes are checked
    init_variables = convert.from_torch_state_dict(
        config.model_name, convert.load_state_dict_file(config.model_init),
        init_variables=abstract, reinit_mismatched=HEAD_KEYS, **config.model)
  return Plan(config, workdir, model, mesh, num_classes, n_train, total, steps_per_epoch,
              config.input.batch_size // jax.process_count(), image_shape, evaluators,
              data_block, init_variables)


def check_workdir(config, workdir: str) -> None:
  """A workdir holds one run: refuse to resume a run of another model into it."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  if old.get("model_name") != config.model_name:
    raise ConfigError(f"workdir {workdir} holds a run of {old.get('model_name')}, not "
                      f"{config.model_name}: use another --workdir")
  new_model = json.loads(config.model.to_json())
  changed = [k for k in new_model if old.get("model", {}).get(k) != new_model[k]]
  if changed:
    k = changed[0]
    raise ConfigError(f"workdir {workdir} holds a run with model.{k}="
                      f"{old['model'].get(k)!r}, now {new_model[k]!r}: use another --workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Train (or resume) the run in `workdir`; returns the last logged metrics and evaluations.

  `devices` (default: all) lets a notebook or a test train on a subset of one host's devices.
  """
  return Trainer(validate(config, workdir, devices)).run()


class Trainer:

  def __init__(self, plan: Plan):
    self.plan, self.config = plan, plan.config
    c = self.config
    self.updates_total = max(plan.total_steps // c.optimizer.accum_steps, 1)
    self.schedule = optimizer.make_schedule(
        c, self.updates_total, plan.steps_per_epoch / c.optimizer.accum_steps)
    self.tx = optimizer.make_optimizer(c, self.schedule)
    self.batch_sharding = sharding.batch_sharding(plan.mesh)
    self.rng = jax.random.key(c.seed)
    init = functools.partial(create_state, plan.model, self.tx, image_shape=plan.image_shape,
                             ema=c.optimizer.ema_decay > 0)
    abstract = jax.eval_shape(init, self.rng)
    self.state_sharding = sharding.state_shardings(plan.mesh, abstract)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_sharding)
    self._init = jax.jit(init, out_shardings=self.state_sharding,
                         compiler_options=compiler_options("init"))
    step_fn = functools.partial(
        train_step, model=plan.model, tx=self.tx, base_rng=jax.random.fold_in(self.rng, 1),
        num_classes=plan.num_classes, mixup=dict(c.mixup), aux_weights=dict(c.aux_loss_weights),
        ema_decay=c.optimizer.ema_decay, accum_steps=c.optimizer.accum_steps)
    self._step = jax.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                         out_shardings=(self.state_sharding, sharding.replicated(plan.mesh)),
                         donate_argnums=(0,),
                         compiler_options=compiler_options("train", compute_dtype(plan.model)))
    self._signal = None
    self.state = None   # the final state, after run()

  # --- setup -------------------------------------------------------------------------------
  def write_run_files(self) -> None:
    os.makedirs(self.plan.workdir, exist_ok=True)
    if jax.process_index() == 0:
      with open(os.path.join(self.plan.workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(self.config.to_json_best_effort(indent=2))

  def initial_state(self, ckpt: checkpoint.Checkpointer) -> TrainState:
    restored = ckpt.restore(self.abstract_state)
    if restored is not None:
      state, meta, step = restored
      log.info("resumed from checkpoint at step %d", step)
      return state
    with jax.set_mesh(self.plan.mesh):
      state = self._init(self.rng)
    return self.load_model_init(state) if self.config.model_init else state

  def load_model_init(self, state: TrainState) -> TrainState:
    c = self.config
    init_vars = {"params": state.params}
    if state.batch_stats:
      init_vars["batch_stats"] = state.batch_stats
    # The variables validate() converted; re-initialised heads take the fresh state's values.
    fresh = lambda conv, init: (np.asarray(init) if isinstance(conv, jax.ShapeDtypeStruct)
                                else conv)
    loaded = jax.tree.map(fresh, self.plan.init_variables, jax.device_get(init_vars))
    params = loaded["params"]
    state = state.replace(params=params, opt_state=self.tx.init(params),
                          batch_stats=loaded.get("batch_stats", state.batch_stats),
                          ema_params=jax.tree.map(np.copy, params) if state.ema_params else {})
    log.info("initialised from %s", c.model_init)
    # Host arrays (and the optimizer state made from them) -> the state's shardings.
    return jax.device_put(state, self.state_sharding)

  def _on_signal(self, signum, frame):
    self._signal = signum

  # --- the loop ----------------------------------------------------------------------------
  def run(self) -> dict:
    """Trains to total_steps; returns the last record (train metrics and evaluations)."""
    p, c = self.plan, self.config
    ckpt = checkpoint.Checkpointer(p.workdir, keep=c.keep_checkpoints)
    writer = None
    try:
      state = self.initial_state(ckpt)   # reads only: a checkpoint that does not fit fails
      start = int(jax.device_get(state.step))   # before anything is written
      self.write_run_files()
      writer = create_writer(p.workdir, start)
      cost = profile.model_cost(p.model, c.input.image_size,
                                variables=self.eval_variables(state, state.params))
      log.info("model %s: %s params, %.3f GMACs at %d px; %d devices %s, global batch %d "
               "(%d per host); steps %d -> %d", c.model_name, f"{cost['params']:,}",
               cost["gmacs"], c.input.image_size, p.mesh.size, dict(p.mesh.shape),
               c.input.batch_size, p.local_batch, start, p.total_steps)
      if start == 0:
        writer.write_hparams({"num_params": cost["params"], "gmacs": cost["gmacs"]})
      if start >= p.total_steps:
        log.info("the run is complete (step %d of %d): evaluating it", start, p.total_steps)
        self.state = state
        return self.evaluate(state, start)
      with _signals(self._on_signal):
        return self._loop(state, start, writer, ckpt)
    finally:
      ckpt.close()
      if writer is not None:
        writer.close()

  def _loop(self, state, start, writer, ckpt) -> dict:
    p, c = self.plan, self.config
    # Each process loads the block of every global batch that its devices hold.
    batches = pipeline.train_iterator(
        c.input, local_batch_size=p.local_batch, seed=c.seed, start_step=start,
        process_index=p.data_block, process_count=jax.process_count())
    progress = _progress(start, p.total_steps)
    step, record = start, {}
    t0, timed_from = time.time(), start   # images/s: steps after the first (compilation)
    with jax.set_mesh(p.mesh), logging_redirect_tqdm():   # log lines above the bar
      while step < p.total_steps:
        batch = sharding.global_batch(next(batches), self.batch_sharding)
        state, metrics = self._step(state, batch)
        step += 1
        last = step == p.total_steps
        if step == start + 1:
          jax.block_until_ready(metrics)
          log.info("first step took %.1fs (compilation included)", time.time() - t0)
          t0, timed_from = time.time(), step
        record = {}
        if (c.log_every_steps and step % c.log_every_steps == 0) or last:
          self._check_finite(state, step, ckpt)
          record = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
          # The lr of the optimizer update this step is part of (the schedule counts updates).
          record["train/lr"] = float(self.schedule((step - 1) // c.optimizer.accum_steps))
          record["train/nonfinite_steps"] = int(jax.device_get(state.nonfinite_count))
          if step > timed_from:
            record["train/images_per_sec"] = ((step - timed_from) * c.input.batch_size
                                              / max(time.time() - t0, 1e-9))
          t0, timed_from = time.time(), step
          progress.update(step, record)
        if (c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0) or last:
          self._check_finite(state, step, ckpt)
          ckpt.save(step, state, self.meta(step))   # before evaluating: async, and safe
        if (c.eval_every_steps and step % c.eval_every_steps == 0) or last:
          record.update(self.evaluate(state, step))
          t0, timed_from = time.time(), step     # keep evaluation out of images/s
        if record:
          writer.write_scalars(step, record)
        if self._interrupted() and not last:
          self._check_finite(state, step, ckpt)
          ckpt.save(step, state, self.meta(step))
          ckpt.wait()
          progress.close()
          log.warning("signal %d: saved checkpoint at step %d; re-run the same command to "
                      "resume", self._signal, step)
          sys.exit(128 + self._signal)
    progress.close()
    self.state = state
    return record

  def evaluate(self, state: TrainState, step: int) -> dict:
    """Every evaluator on the params and, with EMA on, on the averaged params too."""
    out = {}
    for ev in self.plan.evaluators:
      out.update(ev.run(self.eval_variables(state, state.params)))
      if self.config.optimizer.ema_decay > 0:
        res = ev.run(self.eval_variables(state, state.ema_params))
        out.update({k.replace(f"{ev.name}/", f"{ev.name}_ema/", 1): v for k, v in res.items()})
    if out:
      log.info("step %d: %s", step, "  ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out

  def eval_variables(self, state: TrainState, params) -> dict:
    v = {"params": params}
    if state.batch_stats:
      v["batch_stats"] = state.batch_stats
    return v

  def meta(self, step: int) -> dict:
    return {"step": step, "model_name": self.config.model_name, "seed": self.config.seed,
            "global_batch": self.config.input.batch_size, "time": time.time()}

  def _interrupted(self) -> bool:
    if jax.process_count() == 1:
      return self._signal is not None
    flags = multihost_utils.process_allgather(np.int32(self._signal or 0))
    if flags.any() and self._signal is None:
      self._signal = int(flags.max())
    return bool(flags.any())

  def _check_finite(self, state: TrainState, step: int, ckpt) -> None:
    if self.config.nonfinite != "stop":
      return
    first = jax.device_get(state.first_nonfinite)
    if first[0] < 0:
      return
    ckpt.wait()
    good = ckpt.all_steps()
    what = "loss" if first[1] == NONFINITE_LOSS else "gradient norm"
    raise NonFiniteError(
        f"non-finite {what} at step {int(first[0]) + 1}; the update was not applied and "
        f"training stopped. Last checkpoint: "
        f"{'step ' + str(good[-1]) if good else 'none'} (intact). Lower the learning rate, "
        f"enable gradient clipping, or set --config.nonfinite=skip")


@contextlib.contextmanager
def _signals(handler):
  """SIGTERM / SIGINT call `handler` (the loop then saves and exits) instead of killing the
  process; the previous handlers come back afterwards. Python allows this in the main thread
  only: elsewhere (a notebook's worker thread) signals keep their usual effect."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in old.items():
      if h is not None:   # None: a handler installed outside Python, which cannot be restored
        signal.signal(s, h)


class _progress:
  """A tqdm bar on process 0: step / total, ETA, loss, lr and images/s."""

  def __init__(self, start: int, total: int):
    self.bar = None
    if jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                      mininterval=1.0, file=sys.stderr,
                      bar_format="{l_bar}{bar}| step {n_fmt}/{total_fmt} "
                                 "[{elapsed}<{remaining} ETA{postfix}]")
    self.pos = start

  def update(self, step: int, m: dict) -> None:
    if self.bar is None:
      return
    postfix = {"loss": f"{m['train/loss']:.4f}", "lr": f"{m['train/lr']:.2e}"}
    if "train/images_per_sec" in m:
      postfix["img/s"] = f"{m['train/images_per_sec']:.0f}"
    self.bar.set_postfix(postfix, refresh=False)
    self.bar.update(step - self.pos)
    self.pos = step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
