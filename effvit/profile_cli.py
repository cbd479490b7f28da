"""`python -m effvit.profile`: a model's size, cost, compile time, speed and memory per resolution.

  python -m effvit.profile --config=configs/pvt_v2.py:b2 --resolutions=224,448,896 --batch=8
  python -m effvit.profile --config=configs/twins.py:svt_small --compare-timm --dtype=bfloat16

The model is the config's (`create_model(config.model_name, **config.model)`, so every
`--config.model.x=...` override applies). For each resolution (default: config.input.image_size)
it prints
  params, GMACs      effvit.profile.model_cost: multiply-accumulates of matmuls and convs per
                     image, the papers' convention
  compile (s)        jit lower + compile of the inference forward and of a train step
                     (effvit.train.state.train_step: forward, backward, optax AdamW)
  img/s              median over --reps timed calls after a warm-up, block_until_ready
  peak (MiB)         XLA's memory plan of each compiled function (compiled.memory_analysis():
                     temporaries + arguments + outputs, donated buffers once); on GPU/TPU also
                     the allocator's peak_bytes_in_use so far in the process
With --compare-timm the same model is built in timm (random weights; same names for pvt_v2_*,
twins_* and resnest*, none for pvt_v1_* and lavit_*), on as many torch threads as XLA has
cores, and its inference (eval mode, torch.inference_mode) and AdamW train step are timed
interleaved with effvit's; the ratio columns are effvit / timm images/s.
LaViT's Θ/Ψ maps are sized by the token grid, so a "less" model is built with img_size = the
resolution at every resolution (as models/lavit.py measures it).
"""
from __future__ import annotations

import copy
import os
import sys

from absl import flags

from effvit import cli
from effvit.errors import ConfigError

_RES = flags.DEFINE_list("resolutions", None, "Comma-separated input sizes in pixels "
                         "(default: config.input.image_size).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per call, for inference and training.")
_TIMM = flags.DEFINE_bool("compare-timm", False, "Also time the timm model and print ratios.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (float32, bfloat16); default: the "
                             "config's model.dtype.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (the median is reported).")
_STEPS = flags.DEFINE_integer("steps", 1, "Calls per timed repetition.")

TIMM_PREFIXES = ("pvt_v2_", "twins_", "resnest")
# Config fields that change no architecture timm builds (the others must keep their defaults).
TIMM_FREE = ("dtype", "param_dtype", "num_classes", "drop_rate", "attn_drop_rate",
             "drop_path_rate", "remat", "img_size")
MIB = 2**20


def timm_name(model_name: str) -> str | None:
  """timm's name of an effvit model, or None (PVTv1 and LaViT have no timm model)."""
  return model_name if model_name.startswith(TIMM_PREFIXES) else None


def timm_mismatch(config) -> list[str]:
  """Architecture fields the config sets away from the registry model's defaults."""
  from effvit.models.registry import model_fields
  defaults = model_fields(config.model_name)
  norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v
  return [k for k, v in config.model.items()
          if k not in TIMM_FREE and k in defaults and norm(v) != norm(defaults[k])]


def parse_resolutions(values: list[str] | None, default: int) -> list[int]:
  try:
    out = [int(v) for v in values] if values else [int(default)]
  except ValueError:
    raise ConfigError(f"--resolutions={','.join(values)}: expected integers, e.g. "
                      "--resolutions=224,448") from None
  if any(r < 1 for r in out):
    raise ConfigError(f"--resolutions must be positive, got {out}")
  return out


def uses_less(fields) -> bool:
  return "less" in "/".join(fields.get("mixers", ())) and "img_size" in fields


def build(config, res: int, dtype: str | None):
  from effvit.models import create_model
  fields = dict(config.model)
  if dtype:
    fields["dtype"] = dtype
  if uses_less(fields):
    fields["img_size"] = res
  return create_model(config.model_name, **fields), fields


def profile_resolution(config, res: int, batch: int, dtype: str | None, reps: int, steps: int,
                       timm_ref: str | None) -> dict:
  """One row: cost, compile times, images/s and memory at `res` (and timm's, if named)."""
  from effvit.benchmark_utils import (EffvitRunner, TimmRunner, device_peak_bytes, interleave,
                                      warm)
  from effvit.profile import model_cost, model_in_chans
  model, fields = build(config, res, dtype)
  cost = model_cost(model, res)
  eff = EffvitRunner(model, batch, res, in_chans=model_in_chans(model))
  row = {"res": res, "params": cost["params"], "gmacs": cost["gmacs"],
         "compile_infer_s": eff.compile_seconds["inference"],
         "compile_train_s": eff.compile_seconds["train"],
         "infer_mib": eff.memory["inference"].get("peak", float("nan")) / MIB,
         "train_mib": eff.memory["train"].get("peak", float("nan")) / MIB}
  timm = None
  if timm_ref:
    timm = TimmRunner(timm_ref, batch, res, fields.get("dtype", "float32"),
                      num_classes=fields.get("num_classes", 1000),
                      drop_rate=fields.get("drop_rate", 0.0),
                      drop_path_rate=fields.get("drop_path_rate", 0.0))
    row["timm_params"] = timm.num_params()
  for mode in ("infer", "train"):
    runners = {"effvit": getattr(eff, mode)}
    if timm:
      runners["timm"] = getattr(timm, mode)
    for fn in runners.values():
      warm(fn, calls=1)
    sec = interleave(runners, steps, reps, warmup=1)
    row[f"{mode}_ips"] = batch / sec["effvit"]
    if timm:
      row[f"timm_{mode}_ips"] = batch / sec["timm"]
      row[f"{mode}_ratio"] = row[f"{mode}_ips"] / row[f"timm_{mode}_ips"]
  peak = device_peak_bytes()
  if peak is not None:
    row["device_peak_mib"] = peak / MIB
  return row


COLUMNS = (  # (key, heading, format)
    ("res", "res", "d"), ("params", "params (M)", ".3f"), ("gmacs", "GMACs", ".4g"),
    ("compile_infer_s", "compile infer (s)", ".2f"),
    ("compile_train_s", "compile train (s)", ".2f"),
    ("infer_ips", "infer img/s", ".1f"), ("train_ips", "train img/s", ".1f"),
    ("infer_mib", "infer peak (MiB)", ".1f"), ("train_mib", "train peak (MiB)", ".1f"),
    ("device_peak_mib", "device peak (MiB)", ".1f"),
    ("timm_params", "timm params (M)", ".3f"), ("timm_infer_ips", "timm infer img/s", ".1f"),
    ("infer_ratio", "infer effvit/timm", ".2f"),
    ("timm_train_ips", "timm train img/s", ".1f"), ("train_ratio", "train effvit/timm", ".2f"))


def format_table(rows: list[dict]) -> str:
  cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
  cell = lambda r, k, f: format(r[k] / 1e6 if k.endswith("params") else r[k], f) if k in r else "-"
  lines = [[h for _, h, _ in cols]] + [[cell(r, k, f) for k, _, f in cols] for r in rows]
  widths = [max(len(l[i]) for l in lines) for i in range(len(cols))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines)


def profile(config, resolutions: list[int], batch: int, *, dtype: str | None = None,
            compare_timm: bool = False, reps: int = 5, steps: int = 1) -> list[dict]:
  """Prints the header and table; returns the rows."""
  import jax
  from effvit.benchmark_utils import set_threads
  if batch < 1 or reps < 1 or steps < 1:
    raise ConfigError(f"--batch, --reps and --steps must be positive (got {batch}, {reps}, "
                      f"{steps})")
  config = copy.deepcopy(config)
  build(config, resolutions[0], dtype)   # a bad model config or dtype fails before any work
  threads = set_threads(0)
  ref, note = None, ""
  if compare_timm:
    ref = timm_name(config.model_name)
    changed = timm_mismatch(config) if ref else []
    if ref is None:
      note = f"{config.model_name}: no timm model, timm comparison skipped"
    elif changed:
      note = (f"{config.model_name}: the config changes {', '.join(changed)}, so timm's "
              f"{ref} is another architecture: timm comparison skipped")
      ref = None
    else:
      import torch
      from effvit.reference import import_timm
      try:
        timm = import_timm()
      except ModuleNotFoundError as e:
        raise ConfigError(f"--compare-timm needs torch and timm ({e.name} is missing): pip "
                          "install -e '.[reference]'") from None
      torch.set_num_threads(threads)
      note = (f"timm {timm.__version__} {ref} (torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads), eager")
  dev = jax.devices()[0]
  print(f"{config.model_name} on {dev.platform} ({dev.device_kind}, {threads} cores), batch "
        f"{batch}, dtype {dtype or config.model.get('dtype', 'float32')}, median of {reps} x "
        f"{steps} calls", flush=True)
  if uses_less(config.model):
    note += ("; " if note else "") + "less attention: built with img_size = each resolution"
  if note:
    print(note, flush=True)
  rows = []
  for res in resolutions:
    rows.append(profile_resolution(config, res, batch, dtype, reps, steps, ref))
  print(format_table(rows), flush=True)
  return rows


def main(config, workdir=None):
  del workdir
  image_size = config.get("input", {}).get("image_size", 224)
  profile(config, parse_resolutions(_RES.value, image_size), _BATCH.value, dtype=_DTYPE.value,
          compare_timm=_TIMM.value, reps=_REPS.value, steps=_STEPS.value)


def run(argv: list[str] | None = None) -> None:
  """Parse flags and profile; exits (status 2 and one line on a user error)."""
  argv = sys.argv if argv is None else argv
  if any(a in ("--compare-timm", "--compare-timm=true") for a in argv):
    # On a GPU torch shares the device: JAX must not take 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  cli.run(main, argv, compilation_cache=False)   # it times compiles
