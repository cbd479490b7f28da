"""optax optimizer from config: AdamW or SGD, warm-up + cosine schedule, weight-decay mask,
gradient clipping, gradient accumulation (optax.MultiSteps)."""
from __future__ import annotations

import jax
import optax

from effvit.errors import ConfigError


def learning_rate(config) -> float:
  """Peak lr, scaled linearly with the effective batch (batch × accumulation)."""
  o = config.optimizer
  return o.base_lr * config.input.batch_size * o.accum_steps / o.lr_batch_base


def make_schedule(config, total_updates: int, updates_per_epoch: float) -> optax.Schedule:
  s = config.schedule
  warmup = int(round(s.warmup_epochs * updates_per_epoch))
  warmup = min(warmup, max(total_updates - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=s.warmup_lr, peak_value=learning_rate(config), warmup_steps=warmup,
      decay_steps=max(total_updates, warmup + 1), end_value=s.min_lr)


def decay_mask(params):
  """Weight decay on weight matrices and conv kernels only: not on norms, biases, position
  embeddings or the cls token (the references' no_weight_decay rule)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: getattr(path[-1], "key", None) == "kernel" and x.ndim > 1, params)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == "adamw":
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
  elif o.name == "sgd":
    parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
  else:
    raise ConfigError(f"unknown optimizer.name {o.name!r}; choose adamw or sgd")
  tx = optax.chain(*parts)
  if o.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.accum_steps)
  return tx
