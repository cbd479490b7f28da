"""orbax checkpointing of the train state, with restore onto the current mesh.

Checkpoints live in <workdir>/checkpoints/<step>/ (orbax CheckpointManager, async saves,
keep-last-K). Each holds the train state and a small JSON `meta` item (model name, step, the
data position). Restoring always passes an abstract target whose leaves carry the current
mesh's shardings, so a checkpoint written on 8 devices restores onto 1 (and back).

A checkpoint that cannot be read (truncated, corrupted) is reported with its step, moved
aside to checkpoints/corrupt-<step>/ (never deleted) and the next older one is tried. A readable
checkpoint whose train state has other leaves than the current config builds (another optimizer,
accumulation, EMA or model) is a ConfigError and is left in place: its meta item lists the
leaves ("path shape dtype") it was written with.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from effvit.errors import ConfigError

log = logging.getLogger("effvit")


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._keep, self._async = keep, asynchronous
    _save_replicated_arrays_from_one_replica()
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    # create=False: opening (to resume) writes nothing; the first save makes the directory.
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=False,
                                           enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    if step in self._manager.all_steps():
      return
    meta = {**meta, "state": signature(state)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta, step) of the newest readable checkpoint (or of `step`); None if none."""
    self._manager.wait_until_finished()
    _drop_orphaned_read_reports()
    candidates = [step] if step is not None else self.all_steps()[::-1]
    want = signature(abstract_state)
    for s in candidates:
      try:
        meta = dict(self._manager.restore(s, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])
      except Exception as e:  # orbax raises many types for damaged files; report and go on
        if step is not None:
          raise
        self._quarantine(s, _reason(e))
        continue
      if meta.get("state", want) != want:   # checkpoints without a signature: just try
        raise ConfigError(self._mismatch(s, meta["state"], want))
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], meta, s
      except Exception as e:
        if step is not None:
          raise
        self._quarantine(s, _reason(e))
    return None

  def _mismatch(self, step: int, saved: list[str], want: list[str]) -> str:
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    example = "; ".join([f"this config builds {x}" for x in missing[:1]]
                        + [f"the checkpoint holds {x}" for x in extra[:1]])
    return (f"checkpoint {step} in {self.directory} was written by a run with another train "
            f"state ({len(missing) + len(extra)} leaves differ: {example}); optimizer, "
            f"grad_clip_norm, accum_steps, ema_decay or model settings changed: use the run's "
            f"settings (its config.json) or another --workdir")

  def _quarantine(self, step: int, reason: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
    if jax.process_index() == 0 and os.path.isdir(src):
      shutil.move(src, dst)
    if jax.process_count() > 1:   # every host must see the move before re-listing steps
      multihost_utils.sync_global_devices(f"effvit-quarantine-{step}")
    log.warning("checkpoint at step %d is unreadable (%s); moved it to %s and falling back "
                "to an older one", step, reason, dst)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _save_replicated_arrays_from_one_replica() -> None:
  """Orbax's default on CPU and TPU ("replica-parallel") splits each replicated array into one
  slice per replica, each cut by an eager jax op compiled per shape and device: the first save
  of pvt_v2_b0's state on 8 (CPU) devices took 7.8 s instead of 0.1 s on 1, and each later one
  ~1 s. Replicated arrays are written from replica 0 instead, as orbax does on GPUs; sharded
  (FSDP) arrays are still written by the devices that hold them. Restoring reads either layout."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def signature(tree) -> list[str]:
  """'path shape dtype' of every leaf: what a checkpoint must hold to restore into `tree`."""
  return [f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {x.dtype}"
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _drop_orphaned_read_reports() -> None:
  """When a damaged checkpoint fails to restore, orbax stops waiting while other tensorstore
  reads of it are still in flight. Each of those then reports itself when it ends: an
  unraisable "RuntimeError: Event loop is closed", or asyncio's "Task exception was never
  retrieved" with the read's own error, both with a traceback on stderr. The failure itself is
  reported (one line, with the step): drop exactly these reports. Installed once per process,
  in front of the existing hook and as a filter on the asyncio logger."""
  previous = sys.unraisablehook
  if getattr(previous, "effvit", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook.effvit = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_orphaned_orbax_task)


def _orphaned_orbax_task(record: logging.LogRecord) -> bool:
  """False for asyncio's report of an orbax read whose exception nobody retrieved."""
  e = record.exc_info[1] if record.exc_info else None
  if e is None or not record.getMessage().startswith("Task exception was never retrieved"):
    return True
  tb = e.__traceback__
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return False
    tb = tb.tb_next
  return True


def _reason(e: Exception) -> str:
  return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
