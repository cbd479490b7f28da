"""Model registry: `create_model(name, **overrides)` and `list_models()`.

Family files register a factory per model name with `@register`; each factory takes
keyword overrides of its config fields (e.g. `sr_ratios=(4, 2, 1, 1)`, `dtype="bfloat16"`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import numpy as np

from effvit.errors import ConfigError, closest

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
  def wrap(f):
    _MODELS[name or f.__name__] = f
    return f
  return wrap(fn) if fn is not None else wrap


def list_models() -> list[str]:
  _import_families()
  return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
  _import_families()
  if name not in _MODELS:
    raise ConfigError(f"unknown model {name!r}{closest(name, _MODELS, n=5)}; "
                      f"see effvit.models.list_models()")
  return _MODELS[name](**overrides)


def compute_dtype(model: nn.Module):
  """The dtype a built model computes in (its config's `dtype`; None if it has none)."""
  return getattr(getattr(model, "config", model), "dtype", None)


def model_fields(name: str) -> dict:
  """All settings of model `name` with their values: what `create_model` overrides accept.

  Dtypes become their names and tuples stay tuples, so the result can seed a ConfigDict
  whose every field is settable from the command line.
  """
  model = create_model(name)
  cfg = getattr(model, "config", None)
  if dataclasses.is_dataclass(cfg):
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  else:
    values = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name")}
  for key, value in values.items():
    if key.endswith("dtype"):
      values[key] = np.dtype(value).name
  return values


def build_from_table(config_cls, module_cls, base: dict, variant: dict, overrides: dict,
                     name: str) -> nn.Module:
  """module_cls(config_cls(**base | variant | overrides)), rejecting unknown override keys."""
  fields = {f.name for f in dataclasses.fields(config_cls)}
  for key in overrides:
    if key not in fields:
      raise ConfigError(f"{name} has no setting {key!r}{closest(key, fields)}")
  return module_cls(config_cls(**{**base, **variant, **overrides}))


def _import_families():
  # Imported here, not at module import, so `registry` has no import cycle with the families.
  from effvit.models import pvt, twins  # noqa: F401
  for optional in ("resnest", "lavit"):
    try:
      __import__(f"effvit.models.{optional}")
    except ModuleNotFoundError as e:
      if e.name != f"effvit.models.{optional}":
        raise
