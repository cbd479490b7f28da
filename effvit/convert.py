"""PyTorch state_dicts (timm, or the original PVT / Twins / ResNeSt repos) -> Flax variables.

effvit names its modules after timm's keys, made uniform across stages (see
models/pyramid.py), so a Flax leaf path maps to one PyTorch key mechanically:

    stages_1/blocks_0/attn/kv/kernel  <->  stages.1.blocks.0.attn.kv.weight  (transposed)

Each family only needs a few regex renames from its PyTorch names to that canonical form
(timm's PVTv2 `patch_embed` / `stages.i.downsample`, the original repo's `block1.0`,
Twins' `patch_embeds.i` / `blocks.i.j` / `pos_block.i.proj.0`, ...).
Layouts: Linear (out, in) -> Dense (in, out); Conv (O, I/g, kh, kw) -> (kh, kw, I/g, O).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import numpy as np
import jax
import jax.numpy as jnp
from flax import traverse_util

from effvit.errors import ConfigError
from effvit.models import create_model

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


def torch_key(path: tuple[str, ...]) -> str:
  """Flax path -> canonical PyTorch key: 'blocks_3' -> 'blocks.3', 'kernel' -> 'weight'."""
  parts = [re.sub(r"^(.*?)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
  return ".".join(parts + [_LEAF_TO_TORCH.get(path[-1], path[-1])])


def _to_flax_layout(leaf: str, w: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and w.ndim == 2:
    return w.T
  if leaf == "kernel" and w.ndim == 4:
    return w.transpose(2, 3, 1, 0)
  return w


def _to_torch_layout(leaf: str, w: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and w.ndim == 2:
    return w.T
  if leaf == "kernel" and w.ndim == 4:
    return w.transpose(3, 2, 0, 1)
  return w


def _stage(offset: int) -> Callable[[re.Match], str]:
  return lambda m: str(int(m.group(1)) - offset)


# (pattern, replacement) pairs, applied in order, PyTorch name -> canonical name.
def _renames(name: str, num_stages: int) -> list[tuple[str, Any]]:
  last = num_stages - 1
  original_pvt = [   # whai362/PVT (v1 and v2 classification code)
      (r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed."),
      (r"^block(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks."),
      (r"^pos_embed(\d+)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed"),
      (r"^norm(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
      (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
      (r"^cls_token$", f"stages.{last}.cls_token"),
  ]
  if name.startswith(("pvt_v1", "pvt_v2")):
    return [(r"^patch_embed\.", "stages.0.patch_embed."),                      # timm v2
            (r"^stages\.(\d+)\.downsample\.", r"stages.\1.patch_embed."),
            *original_pvt]
  if name.startswith("twins"):
    return [(r"^patch_embeds\.(\d+)\.", r"stages.\1.patch_embed."),
            (r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
            (r"^pos_block\.(\d+)\.proj\.0\.", r"stages.\1.pos_block.proj.")]
  return []   # ResNeSt: timm and the original repo already use the canonical names


def canonical_state_dict(name: str, state_dict: Mapping[str, Any],
                         num_stages: int = 4) -> dict[str, np.ndarray]:
  """Numpy arrays under canonical keys; buffers that carry no state are dropped."""
  rules = _renames(name, num_stages)
  out = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    out[key] = _to_numpy(value)
  return out


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):   # a torch tensor; torch is only needed by the caller
    value = value.detach().cpu().float().numpy() if value.is_floating_point() \
        else value.detach().cpu().numpy()
  return np.asarray(value)


def abstract_variables(model, input_size: int = 224) -> dict:
  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], *,
                          skip: tuple[str, ...] = (), init_variables: dict | None = None,
                          reinit_mismatched: tuple[str, ...] = (), **overrides) -> dict:
  """Flax variables of model `name` (built with `overrides`) holding `state_dict`'s weights.

  `skip` holds regexes of canonical PyTorch keys (e.g. r"^head\\.") left as in
  `init_variables` instead; `reinit_mismatched` does so only where the shapes differ (a
  classifier head with another number of classes when fine-tuning).
  Raises ConfigError naming missing, unexpected or mis-shaped keys.
  """
  model = create_model(name, **overrides)
  num_stages = len(getattr(getattr(model, "config", None), "depths", (0,) * 4))
  sd = canonical_state_dict(name, state_dict, num_stages)
  template = abstract_variables(model)
  flat = traverse_util.flatten_dict(template)
  init_flat = traverse_util.flatten_dict(init_variables) if init_variables else {}
  out, missing, bad_shape, used = {}, [], [], set()
  for path, leaf in flat.items():
    key = torch_key(path[1:])
    if any(re.search(p, key) for p in skip):
      if path not in init_flat:
        raise ConfigError(f"skipping {key} needs init_variables that hold it")
      out[path] = init_flat[path]
      used.add(key)
      continue
    if key not in sd:
      missing.append(key)
      continue
    used.add(key)
    w = _to_flax_layout(path[-1], sd[key])
    if w.shape != leaf.shape and path in init_flat and any(
        re.search(p, key) for p in reinit_mismatched):
      out[path] = init_flat[path]
      continue
    if w.shape != leaf.shape:
      bad_shape.append(f"{key}: checkpoint {tuple(sd[key].shape)} vs model {leaf.shape}")
      continue
    out[path] = w.astype(leaf.dtype)
  unexpected = sorted(set(sd) - used - {k for k in sd if any(re.search(p, k) for p in skip)})
  problems = []
  if bad_shape:
    problems.append(f"{len(bad_shape)} shape mismatches ({'; '.join(bad_shape[:3])})")
  if missing:
    problems.append(f"{len(missing)} missing keys ({', '.join(missing[:5])})")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])})")
  if problems:
    raise ConfigError(f"state_dict does not fit {name}: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out)


# Canonical name -> the reference's name, so an export loads strictly into timm (or, for
# PVTv1, which timm lacks, into the original repo) and from_torch_state_dict round-trips.
def _export_renames(name: str, num_stages: int) -> list[tuple[str, Any]]:
  plus1 = lambda fmt: lambda m: fmt.format(int(m.group(1)) + 1)
  if name.startswith("pvt_v1"):
    return [(r"^stages\.(\d+)\.patch_embed\.", plus1("patch_embed{}.")),
            (r"^stages\.(\d+)\.blocks\.", plus1("block{}.")),
            (r"^stages\.(\d+)\.pos_embed$", plus1("pos_embed{}")),
            (rf"^stages\.{num_stages - 1}\.cls_token$", "cls_token")]
  if name.startswith("pvt_v2"):
    return [(r"^stages\.0\.patch_embed\.", "patch_embed."),
            (r"^stages\.(\d+)\.patch_embed\.", r"stages.\1.downsample.")]
  if name.startswith("twins"):
    return [(r"^stages\.(\d+)\.patch_embed\.", r"patch_embeds.\1."),
            (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2."),
            (r"^stages\.(\d+)\.pos_block\.proj\.", r"pos_block.\1.proj.0.")]
  return []


def to_torch_state_dict(name: str, variables: dict) -> dict[str, np.ndarray]:
  """PyTorch-layout arrays for Flax `variables` under the reference's key names (for export).

  Names are timm's (PVTv2, Twins, ResNeSt) or the original repo's (PVTv1), so
  to_torch_state_dict(name, from_torch_state_dict(name, sd)) == sd for a timm state_dict.
  """
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  num_stages = len({p[1] for p in flat if len(p) > 2 and p[1].startswith("stages_")})
  rules = _export_renames(name, num_stages)
  out = {}
  for path, value in flat.items():
    key = torch_key(path[1:])
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    out[key] = _to_torch_layout(path[-1], np.asarray(value))
  return out


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
  """A `.safetensors` or `.pth`/`.pt`/`.bin` file -> {key: array}; unwraps 'model'/'state_dict'."""
  if not os.path.isfile(path):
    raise ConfigError(f"weights file {path!r} does not exist")
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      return load_file(path)
    import torch  # the `reference` extra; only .pth files need it
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except ModuleNotFoundError as e:
    raise ConfigError(f"reading {path!r} needs {e.name}: pip install -e '.[reference]', or "
                      "convert the file to .safetensors") from None
  except Exception as e:  # corrupt or foreign files: say which file and why, in one line
    raise ConfigError(f"cannot read weights file {path!r}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from None
  for key in ("state_dict", "model", "model_ema"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise ConfigError(f"{path!r} holds a {type(obj).__name__}, not a state_dict")
  return {k: _to_numpy(v) for k, v in obj.items()}
