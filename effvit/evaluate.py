"""Exact evaluation over `config.evals`, shared by training and eval.py.

Each entry of `config.evals` names a TFDS dataset and split with its preprocessing. Batches
have a fixed shape; the last one is padded with masked examples, so every example counts
exactly once on any number of devices and hosts, and the jitted step compiles once.
"""
from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import optax

from effvit.data import pipeline
from effvit.errors import ConfigError
from effvit.train import sharding

log = logging.getLogger("effvit")


def eval_step(variables, batch, *, model):
  """Sums over the unmasked examples of a batch: correct top-1/top-5, loss, count."""
  logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
  labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top5 = jax.lax.top_k(logits, 5)[1]
  correct5 = jnp.any(top5 == labels[:, None], axis=-1)
  correct1 = top5[:, 0] == labels
  return {"top1": jnp.sum(correct1 * mask), "top5": jnp.sum(correct5 * mask),
          "loss": jnp.sum(loss * mask), "examples": jnp.sum(mask)}


class Evaluator:
  """Evaluates variables on one dataset split; `run(variables)` -> {'<name>/top1': ...}."""

  def __init__(self, name: str, cfg, model, mesh):
    self.name, self.cfg, self.mesh = name, cfg, mesh
    sharding.check_batch_size(cfg.batch_size, mesh)
    self.local_batch = cfg.batch_size // jax.process_count()
    # Fails early (before training starts) when the dataset is missing.
    pipeline.dataset_info(cfg.dataset, cfg.split, cfg.get("data_dir"))
    self.batch_sharding = sharding.batch_sharding(mesh)
    self._step = jax.jit(lambda v, b: eval_step(v, b, model=model),
                         out_shardings=sharding.replicated(mesh))

  def run(self, variables) -> dict[str, float]:
    num_batches, batches = pipeline.eval_batches(
        self.cfg, local_batch_size=self.local_batch, process_index=jax.process_index(),
        process_count=jax.process_count())
    totals, t0 = None, time.time()
    with jax.set_mesh(self.mesh):
      for i, local in zip(range(num_batches), batches):
        batch = sharding.global_batch(local, self.batch_sharding)
        out = self._step(variables, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    n = max(totals["examples"], 1.0)
    seconds = time.time() - t0
    return {f"{self.name}/top1": totals["top1"] / n, f"{self.name}/top5": totals["top5"] / n,
            f"{self.name}/loss": totals["loss"] / n, f"{self.name}/examples": totals["examples"],
            f"{self.name}/images_per_sec": totals["examples"] / max(seconds, 1e-9)}


def make_evaluators(config, model, mesh) -> list[Evaluator]:
  evals = []
  for name, cfg in config.evals.items():
    if "/" in name:
      raise ConfigError(f"eval name {name!r} must not contain '/'")
    evals.append(Evaluator(name, cfg, model, mesh))
  return evals
