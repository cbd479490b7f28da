"""orbax checkpointing of the train state, with restore onto the current mesh.

Checkpoints live in <workdir>/checkpoints/<step>/ (orbax CheckpointManager, async saves,
keep-last-K). Each holds the train state and a small JSON `meta` item (model name, step, the
data position). Restoring always passes an abstract target whose leaves carry the current
mesh's shardings, so a checkpoint written on 8 devices restores onto 1 (and back).

A checkpoint that cannot be read (truncated, corrupted) is reported with its step, moved
aside to checkpoints/corrupt-<step>/ (never deleted) and the next older one is tried.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("effvit")


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._keep, self._async = keep, asynchronous
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                           enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta, step) of the newest readable checkpoint (or of `step`); None if none."""
    self._manager.wait_until_finished()
    candidates = [step] if step is not None else self.all_steps()[::-1]
    for s in candidates:
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"]), s
      except Exception as e:  # orbax raises many types for damaged files; report and go on
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if step is not None:
          raise
        self._quarantine(s, reason)
    return None

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
