"""Shared pieces of every effvit config.

A config file defines `get_config(arg)` where `arg` is the text after ':' in
`--config=configs/pvt_v2.py:b2,batch=256`: a variant name followed by optional key=value pairs
(`batch`, `epochs`, `steps`, `res`, `runlocal`). Every field can also be set with
`--config.a.b=value`; unknown fields are errors.

The ImageNet recipe below is the DeiT/PVT one that PVT, PVTv2, Twins and (by our choice, see
refs/lavit.md §7) LaViT train with: AdamW, lr 5e-4 × batch/512, weight decay 0.05 on weights
only, 5 warm-up epochs from 1e-6, cosine to 1e-5, label smoothing 0.1, Mixup 0.8 / CutMix 1.0
(switch 0.5), RandAugment m9, 300 epochs.
"""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from effvit.data.pipeline import default_eval_config, default_input_config

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'b2,batch=256,runlocal' -> ConfigDict(variant='b2', batch=256, runlocal=True, ...)."""
  out = dict(defaults)
  for i, item in enumerate(p for p in (arg or "").split(",") if p):
    key, sep, value = item.partition("=")
    if not sep:
      if i == 0 and key not in defaults:
        out["variant"] = key
        continue
      value = "True"
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(out))}")
    kind = type(out[key]) if out[key] is not None else str
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return ml_collections.ConfigDict(out)


def check_variant(arg: ml_collections.ConfigDict, family: str, variants) -> str:
  """arg.variant if it is one of `variants`, else a ValueError that lists them."""
  from effvit.errors import closest
  if arg.variant not in variants:
    raise ValueError(f"unknown {family} variant {arg.variant!r}{closest(arg.variant, variants)}; "
                     f"choose from {', '.join(variants)}")
  return arg.variant


def model_config(model_name: str, **overrides) -> ml_collections.ConfigDict:
  """Every field of the model's config with its default, so each one is overridable by flag."""
  from effvit.models.registry import model_fields
  fields = model_fields(model_name)
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"{model_name} has no fields {sorted(unknown)}")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def base_config(model_name: str, *, num_classes: int = 1000, **model_overrides):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = model_name
  c.model = model_config(model_name, num_classes=num_classes, **model_overrides)
  # Converted PyTorch weights (.safetensors / .pth, timm or original-repo names) to start from;
  # a classifier head whose shape does not match is re-initialised.
  c.model_init = ""

  c.input = default_input_config()
  c.input.dataset = "imagenet2012"
  c.input.split = "train"
  c.input.batch_size = 1024           # global batch, split over hosts and devices

  c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                                           label_smoothing=0.1))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", base_lr=5e-4, lr_batch_base=512,   # lr = base_lr * batch / lr_batch_base
      b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False,
      weight_decay=0.05, grad_clip_norm=0.0, accum_steps=1, ema_decay=0.0))
  c.schedule = ml_collections.ConfigDict(dict(warmup_epochs=5.0, warmup_lr=1e-6, min_lr=1e-5))
  c.total_epochs = 300.0
  c.total_steps = 0                   # > 0 overrides total_epochs
  c.num_train_examples = 0            # 0: read from the dataset's metadata

  # Auxiliary losses sown into the "losses" collection, by name -> weight.
  c.aux_loss_weights = ml_collections.ConfigDict(dict(dp_loss=0.1))
  c.nonfinite = "stop"                # "stop": exit non-zero; "skip": drop the update, count it

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))   # -1: all remaining devices
  c.log_every_steps = 50              # log / checkpoint / eval every N steps; 0: at the end
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 5000

  c.evals = ml_collections.ConfigDict()
  c.evals.val = imagenet_eval("imagenet2012", "validation")
  return c


def imagenet_eval(dataset: str, split: str, **kw) -> ml_collections.ConfigDict:
  e = default_eval_config()
  e.dataset, e.split = dataset, split
  e.batch_size = 256
  e.update(kw)
  return e


def apply_common_args(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict):
  """Shared `:key=value` shortcuts: batch, epochs, steps, res, runlocal (a 2-minute smoke run),
  evals (e.g. `evals=val+real+v2+a+r+sketch`: effvit.evaluate.STANDARD_EVALS, each with
  evals.val's preprocessing)."""
  if arg.get("evals"):
    from effvit.evaluate import standard_evals
    c.evals = standard_evals(arg.evals, template=c.evals.val)
  if arg.get("batch"):
    c.input.batch_size = arg.batch
  if arg.get("epochs"):
    c.total_epochs = float(arg.epochs)
  if arg.get("steps"):
    c.total_steps = arg.steps
  if arg.get("res"):
    c.input.image_size = arg.res
    for e in c.evals.values():
      e.image_size = arg.res
  if arg.get("runlocal"):
    c.input.batch_size = 8
    c.total_steps = 10
    c.log_every_steps = 2
    c.checkpoint_every_steps = 5
    c.eval_every_steps = 10
    c.num_train_examples = 64
    for e in c.evals.values():
      e.batch_size = 8
      e.split = f"{e.split}[:16]"
  return c


COMMON_ARGS = dict(variant="", batch=0, epochs=0, steps=0, res=0, runlocal=False, evals="")
