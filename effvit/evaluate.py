"""Exact evaluation over `config.evals`, shared by training and eval.py.

Each entry of `config.evals` names a TFDS dataset and split with its preprocessing. Batches
have a fixed shape; the last one is padded with masked examples, so every example counts
exactly once on any number of devices and hosts, and the jitted step compiles once.

Labels per dataset. Three fields of an entry say how the dataset's labels meet the model's
logits; left at their defaults they are chosen from the dataset, so an entry only names the
dataset and split:

  label_key     feature holding the label(s); "": the dataset's supervised label
  multilabel    None: True when that feature is a set of classes (ReaL)
  class_subset  "auto": "present" for imagenet_a / imagenet_r; "wnids" when the dataset's
                classes are ImageNet wnids other than the model's 1000 (imagenette); else
                "none"
                "none": labels index the model's classes (the class counts must agree)
                "present": logits are restricted to the classes that occur in the split
                "wnids": dataset class k is the ImageNet class with wnid names[k]; logits are
                restricted to those classes

  dataset (TFDS name/config)         split        label in TFDS             handling
  imagenet2012                       validation,  label: 1 of 1000          plain
                                     train[99%:]  (minival)
  imagenet2012_subset/1pct, /10pct   train, validation  label: 1 of 1000    plain
  imagenet_v2/matched-frequency,     test         label: 1 of 1000          plain
    /threshold-0.7, /topimages
  imagenet_sketch                    test         label: 1 of 1000          plain
  imagenet2012_real                  validation   real_label: a set of      multilabel (ReaL)
                                                  ImageNet classes
  imagenet_a, imagenet_r             test         label: 1 of 1000, 200     present: 200-way
                                                  classes occur
  imagenette/<size>                  validation   label: 1 of 10, named     wnids: 10-way
                                                  by ImageNet wnid

ReaL (Beyer et al. 2020): a prediction is correct when it is in the example's set of real
labels; examples whose set is empty are left out of every metric and of `examples`. The loss
of a multilabel example is the mean over its labels of -log p(label). Restricting the logits
to a subset of classes (ImageNet-A/R, Imagenette) takes top-1, top-5 and the loss over those
classes only, as the datasets' papers evaluate 1000-way models.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from effvit.data import pipeline
from effvit.errors import ConfigError
from effvit.train import sharding
from effvit.xla_cpu import compiler_options

log = logging.getLogger("effvit")

CLASS_SUBSETS = ("auto", "none", "present", "wnids")
# Short names for `--config=configs/<family>.py:<variant>,evals=val+real+v2`: (dataset, split).
STANDARD_EVALS = {
    "val": ("imagenet2012", "validation"),
    "minival": ("imagenet2012", "train[99%:]"),
    "real": ("imagenet2012_real", "validation"),
    "v2": ("imagenet_v2/matched-frequency", "test"),
    "v2_threshold": ("imagenet_v2/threshold-0.7", "test"),
    "v2_top": ("imagenet_v2/topimages", "test"),
    "a": ("imagenet_a", "test"),
    "r": ("imagenet_r", "test"),
    "sketch": ("imagenet_sketch", "test"),
    "imagenette": ("imagenette/320px-v2", "validation"),
    "subset_1pct": ("imagenet2012_subset/1pct", "train"),
    "subset_10pct": ("imagenet2012_subset/10pct", "train"),
}
# Datasets whose labels use all 1000 ImageNet classes but whose images cover only some.
PRESENT_CLASS_DATASETS = ("imagenet_a", "imagenet_r")
RESULTS_FILE = "eval_results.json"


def eval_step(variables, batch, *, model, label_map=None, class_mask=None,
              multilabel: bool = False):
  """Sums over the counted examples of a batch: correct top-1/top-5, loss, count.

  label_map: dataset class -> model class (None: the same); class_mask: [num_classes] bool,
  the model classes the dataset can have (None: all). Multilabel labels are multi-hot.
  """
  logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
  if class_mask is not None:
    logits = jnp.where(class_mask, logits, -jnp.inf)
  logp = jax.nn.log_softmax(logits)
  k = min(5, logits.shape[-1] if class_mask is None else int(np.sum(class_mask)))
  top = jax.lax.top_k(logits, k)[1]
  mask = batch["mask"]
  if multilabel:
    hot = batch["label"]
    if label_map is not None:
      raise ValueError("multilabel evaluation with a label map is not supported")
    counted = mask & jnp.any(hot, axis=-1)
    hit = jnp.take_along_axis(hot, top, axis=-1)
    correct1, correct5 = hit[:, 0], jnp.any(hit, axis=-1)
    n_labels = jnp.maximum(jnp.sum(hot, axis=-1), 1)
    loss = -jnp.sum(jnp.where(hot, logp, 0.0), axis=-1) / n_labels
  else:
    labels = batch["label"]
    if label_map is not None:
      labels = jnp.asarray(label_map)[labels]
    counted = mask
    correct1 = top[:, 0] == labels
    correct5 = jnp.any(top == labels[:, None], axis=-1)
    loss = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  counted = counted.astype(jnp.float32)
  # where(): padded examples may carry a label outside a class subset (loss inf, 0 * inf nan).
  return {"top1": jnp.sum(correct1 * counted), "top5": jnp.sum(correct5 * counted),
          "loss": jnp.sum(jnp.where(counted > 0, loss, 0.0)), "examples": jnp.sum(counted)}


@dataclasses.dataclass(frozen=True)
class Labels:
  """How an eval entry's labels meet the model's logits (resolved from the dataset)."""
  key: str
  multilabel: bool
  class_subset: str                   # "none", "present" or "wnids" (never "auto")
  label_map: np.ndarray | None        # dataset class -> model class
  class_mask: np.ndarray | None       # model classes the dataset can have

  def step_kwargs(self) -> dict:
    return dict(label_map=self.label_map, class_mask=self.class_mask, multilabel=self.multilabel)


def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 ImageNet class wnids in TFDS's class order (imagenet2012's label names)."""
  import tensorflow_datasets as tfds
  path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
  return tuple(path.read_text().split())


def resolve_labels(name: str, cfg, num_classes: int | None) -> Labels:
  """The label handling of eval entry `name` for a model with `num_classes` outputs."""
  builder = pipeline.load_builder(cfg.dataset, cfg.get("data_dir"))
  spec = pipeline.label_spec(builder, cfg.get("label_key") or "", cfg.get("multilabel"))
  num_classes = num_classes or spec.num_classes
  mode = cfg.get("class_subset") or "auto"
  where = f"eval {name!r} ({cfg.dataset}, label {spec.key!r})"
  if mode not in CLASS_SUBSETS:
    raise ConfigError(f"{where}: class_subset={mode!r}; choose one of {', '.join(CLASS_SUBSETS)}")
  wnids = None
  if mode in ("auto", "wnids") and num_classes == 1000 and spec.num_classes != num_classes:
    wnids = imagenet_wnids()
  if mode == "auto":
    if builder.name in PRESENT_CLASS_DATASETS and spec.num_classes == num_classes:
      mode = "present"
    elif wnids is not None and set(spec.names) <= set(wnids):
      mode = "wnids"
    else:
      mode = "none"
  if mode == "none":
    if spec.num_classes != num_classes:
      raise ConfigError(f"{where}: the dataset has {spec.num_classes} classes, the model "
                        f"{num_classes}; its classes are not ImageNet wnids that could be "
                        "mapped (class_subset='wnids'): evaluate a model trained on it")
    return Labels(spec.key, spec.multilabel, mode, None, None)
  if mode == "present":
    if spec.num_classes != num_classes:
      raise ConfigError(f"{where}: class_subset='present' needs labels in the model's "
                        f"{num_classes} classes; the dataset has {spec.num_classes}")
    present = pipeline.present_classes(cfg.dataset, cfg.split, cfg.get("data_dir"), spec.key)
    mask = np.zeros(num_classes, bool)
    mask[list(present)] = True
    log.info("eval %s: logits restricted to the %d classes present in %s", name, len(present),
             cfg.dataset)
    return Labels(spec.key, spec.multilabel, mode, None, mask)
  # "wnids"
  if num_classes != 1000:
    raise ConfigError(f"{where}: class_subset='wnids' maps labels onto the 1000 ImageNet "
                      f"classes; the model has {num_classes}")
  wnids = wnids or imagenet_wnids()
  index = {w: i for i, w in enumerate(wnids)}
  unknown = [n for n in spec.names if n not in index]
  if unknown:
    raise ConfigError(f"{where}: class_subset='wnids' needs classes named by ImageNet wnids; "
                      f"{len(unknown)} are not ({', '.join(unknown[:3])})")
  if spec.multilabel:
    raise ConfigError(f"{where}: class_subset='wnids' is for single-label datasets")
  label_map = np.array([index[n] for n in spec.names], np.int32)
  mask = np.zeros(1000, bool)
  mask[label_map] = True
  return Labels(spec.key, spec.multilabel, mode, label_map, mask)


def standard_evals(names: str, template):
  """config.evals holding the '+'-separated STANDARD_EVALS `names`, each a copy of `template`
  (the model's preprocessing and batch size) with its dataset and split."""
  import ml_collections
  evals = ml_collections.ConfigDict()
  for name in [n for n in names.split("+") if n]:
    if name not in STANDARD_EVALS:
      from effvit.errors import closest
      raise ValueError(f"unknown eval {name!r}{closest(name, STANDARD_EVALS)}; known: "
                       f"{', '.join(STANDARD_EVALS)}")
    entry = pipeline.default_eval_config()   # keeps the typed placeholders (data_dir, ...)
    for key, value in template.items():
      if value is not None:
        entry[key] = value
    entry.dataset, entry.split = STANDARD_EVALS[name]
    evals[name] = entry
  return evals


def model_num_classes(model) -> int | None:
  config = getattr(model, "config", None)
  return getattr(config, "num_classes", None) or getattr(model, "num_classes", None)


class Evaluator:
  """Evaluates variables on one dataset split; `run(variables)` -> {'<name>/top1': ...}."""

  def __init__(self, name: str, cfg, model, mesh, num_classes: int | None = None):
    self.name, self.cfg, self.mesh = name, cfg, mesh
    sharding.check_batch_size(cfg.batch_size, mesh)
    self.local_batch = cfg.batch_size // jax.process_count()
    # Fails early (before training starts) when the dataset or split is missing.
    self.num_examples = pipeline.dataset_info(cfg.dataset, cfg.split, cfg.get("data_dir"))[1]
    self.labels = resolve_labels(name, cfg, num_classes or model_num_classes(model))
    self.batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    step = functools.partial(eval_step, model=model, **self.labels.step_kwargs())
    options = compiler_options("inference")
    self._step = jax.jit(step, out_shardings=replicated, compiler_options=options)
    self._predict = jax.jit(
        lambda v, b: (model.apply(v, b["image"], train=False), b["label"], b["mask"]),
        out_shardings=replicated, compiler_options=options)

  def _batches(self):
    num_batches, batches = pipeline.eval_batches(
        self.cfg, local_batch_size=self.local_batch, process_index=jax.process_index(),
        process_count=jax.process_count())
    for _, local in zip(range(num_batches), batches):
      yield sharding.global_batch(local, self.batch_sharding)

  def run(self, variables) -> dict[str, float]:
    totals, t0 = None, time.time()
    t_first, first = t0, 0.0
    with jax.set_mesh(self.mesh):
      for i, batch in enumerate(self._batches()):
        out = self._step(variables, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        if i == 0:  # the first batch pays for compilation: throughput is measured after it
          first, t_first = float(out["examples"]), time.time()
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    t_end = time.time()
    n = max(totals["examples"], 1.0)
    if totals["examples"] > first:
      images_per_sec = (totals["examples"] - first) / max(t_end - t_first, 1e-9)
    else:
      images_per_sec = totals["examples"] / max(t_end - t0, 1e-9)
    p = self.name
    return {f"{p}/top1": totals["top1"] / n, f"{p}/top5": totals["top5"] / n,
            f"{p}/loss": totals["loss"] / n, f"{p}/examples": totals["examples"],
            f"{p}/images_per_sec": images_per_sec, f"{p}/seconds": t_end - t0}

  def predict(self, variables) -> dict[str, np.ndarray]:
    """Raw logits and labels of every example, in the order `run` reads them (for analysis).

    Every host gets all examples (global batch order); padding is dropped.
    """
    logits, labels = [], []
    with jax.set_mesh(self.mesh):
      for batch in self._batches():
        out, label, mask = jax.device_get(self._predict(variables, batch))
        logits.append(np.asarray(out)[mask])
        labels.append(np.asarray(label)[mask])
    return {"logits": np.concatenate(logits), "label": np.concatenate(labels)}


def make_evaluators(config, model, mesh) -> list[Evaluator]:
  evals = []
  num_classes = config.model.get("num_classes") if "model" in config else None
  for name, cfg in config.evals.items():
    if "/" in name:
      raise ConfigError(f"eval name {name!r} must not contain '/'")
    evals.append(Evaluator(name, cfg, model, mesh, num_classes))
  return evals


# --- eval.py: restore weights, evaluate every entry, report ------------------------------------

@dataclasses.dataclass
class Weights:
  """Where the evaluated weights come from."""
  kind: str                 # "checkpoint" or "model_init"
  path: str                 # checkpoints directory, or the weights file
  step: int | None = None   # checkpoint step; None: the newest


def _steps(checkpoints_dir: str) -> list[int]:
  if not os.path.isdir(checkpoints_dir):
    return []
  return sorted(int(d) for d in os.listdir(checkpoints_dir)
                if d.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, d)))


def find_weights(config, workdir: str | None, checkpoint: str | None) -> Weights:
  """--checkpoint (a step dir, a run's workdir or its checkpoints dir), else the workdir's
  newest checkpoint, else config.model_init."""
  if checkpoint:
    path = os.path.abspath(checkpoint.rstrip("/"))
    if not os.path.isdir(path):
      raise ConfigError(f"--checkpoint={checkpoint} does not exist")
    if _steps(os.path.join(path, "checkpoints")):
      return Weights("checkpoint", os.path.join(path, "checkpoints"))
    if os.path.basename(path).isdigit():
      return Weights("checkpoint", os.path.dirname(path), int(os.path.basename(path)))
    if _steps(path):
      return Weights("checkpoint", path)
    raise ConfigError(f"--checkpoint={checkpoint} holds no checkpoint: give a run's workdir "
                      "or one of its step directories (<workdir>/checkpoints/<step>)")
  if workdir and _steps(os.path.join(workdir, "checkpoints")):
    if config.get("model_init"):
      log.info("evaluating the checkpoints of %s, not model_init %s", workdir, config.model_init)
    return Weights("checkpoint", os.path.abspath(os.path.join(workdir, "checkpoints")))
  if config.get("model_init"):
    return Weights("model_init", config.model_init)
  raise ConfigError(f"nothing to evaluate: {'--workdir ' + workdir if workdir else 'no --workdir'}"
                    " has no checkpoints; give --workdir=<run>, --checkpoint=PATH or "
                    "--config.model_init=<.safetensors|.pth>")


def _check_run_config(config, checkpoints_dir: str) -> None:
  """A checkpoint restores only into the model it was trained as: say so before orbax does."""
  path = os.path.join(os.path.dirname(checkpoints_dir), "config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  run = os.path.dirname(checkpoints_dir)
  if old.get("model_name") != config.model_name:
    raise ConfigError(f"{run} is a run of {old.get('model_name')}, not {config.model_name}: "
                      "evaluate it with the config it was trained with")
  new_model = json.loads(config.model.to_json())
  for key, value in new_model.items():
    saved = old.get("model", {}).get(key, value)
    if saved != value and not (isinstance(saved, list) and list(value or []) == saved):
      raise ConfigError(f"{run} was trained with model.{key}={saved!r}, the config has "
                        f"{value!r}: set --config.model.{key} to match")


def abstract_variables(model, mesh, image_size: int) -> dict:
  """The model's variables as ShapeDtypeStructs carrying shardings on `mesh`."""
  rng = jax.random.key(0)
  abstract = jax.eval_shape(
      lambda x: model.init({"params": rng, "dropout": rng}, x),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  abstract = {k: v for k, v in abstract.items() if k in ("params", "batch_stats") and v}
  shardings = sharding.state_shardings(mesh, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore_checkpoint(weights: Weights, target: dict) -> tuple[dict, int]:
  """(variables, step): only params (and batch_stats) are read, never the optimizer state."""
  import orbax.checkpoint as ocp
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)   # read_only makes orbax warn that it is read-only
  try:
    manager = ocp.CheckpointManager(weights.path, options=ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False))
  finally:
    absl_log.setLevel(level)
  steps = sorted(manager.all_steps())
  step = weights.step if weights.step is not None else (steps[-1] if steps else None)
  if step is None or step not in steps:
    raise ConfigError(f"no checkpoint step {step} in {weights.path} (steps: "
                      f"{', '.join(map(str, steps)) or 'none'})")
  restore_args = jax.tree.map(
      lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
      target)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
  except Exception as e:  # orbax raises many types for damaged or mismatched checkpoints
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise ConfigError(f"cannot restore checkpoint {weights.path}/{step}: {reason}") from None
  finally:
    manager.close()
  return dict(restored["state"]), step


def load_variables(config, model, mesh, weights: Weights) -> tuple[dict[str, dict], int | None]:
  """({"": variables, "_ema": EMA variables (runs with optimizer.ema_decay > 0)}, step)."""
  target = abstract_variables(model, mesh, config.input.image_size)
  if weights.kind == "checkpoint":
    _check_run_config(config, weights.path)
    ema = config.get("optimizer", {}).get("ema_decay", 0) > 0
    if ema:   # the trainer evaluates both; so does eval.py
      target["ema_params"] = target["params"]
    restored, step = restore_checkpoint(weights, target)
    variables = {"": {k: v for k, v in restored.items() if k != "ema_params"}}
    if ema:
      variables["_ema"] = {**variables[""], "params": restored["ema_params"]}
    return variables, step
  from effvit import convert
  sd = convert.load_state_dict_file(weights.path)
  loaded = convert.from_torch_state_dict(config.model_name, sd, **config.model)
  loaded = {k: loaded[k] for k in target}
  return {"": jax.device_put(loaded, jax.tree.map(lambda t: t.sharding, target))}, None


def format_table(rows: list[dict]) -> str:
  head = ("eval", "dataset", "split", "examples", "top-1 %", "top-5 %", "loss", "images/s")
  cells = [head] + [(r["name"], r["dataset"], r["split"], f"{r['examples']:.0f}",
                     f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}", f"{r['loss']:.4f}",
                     f"{r['images_per_sec']:.1f}") for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(row, widths))) for row in cells]
  return "\n".join(lines)


def evaluate(config, workdir: str | None, checkpoint: str | None = None) -> dict:
  """eval.py: evaluate a checkpoint or converted weights on every entry of config.evals.

  Prints a table and writes <workdir>/eval_results.json (the run's own directory when only
  --checkpoint is given). Returns that report.
  """
  from effvit.models import create_model
  if not config.get("evals"):
    raise ConfigError("config.evals is empty: nothing to evaluate")
  weights = find_weights(config, workdir, checkpoint)
  model = create_model(config.model_name, **config.model)
  mesh = sharding.make_mesh(config.mesh)
  evaluators = make_evaluators(config, model, mesh)   # every dataset checked before restoring
  variables, step = load_variables(config, model, mesh, weights)
  source = (f"{weights.path}/{step}" if weights.kind == "checkpoint"
            else os.path.abspath(weights.path))
  log.info("evaluating %s (%s) on %d devices %s", config.model_name, source, mesh.size,
           dict(mesh.shape))
  rows = []
  for ev in evaluators:
    for suffix, v in variables.items():
      res = ev.run(v)
      row = dict(name=ev.name + suffix, dataset=ev.cfg.dataset, split=ev.cfg.split,
                 **{k.split("/", 1)[1]: x for k, x in res.items()})
      rows.append(row)
      log.info("%s: %s", row["name"], "  ".join(f"{k}={x:.4f}" for k, x in res.items()))
  report = {"model_name": config.model_name, "weights": source, "step": step,
            "devices": mesh.size, "time": time.time(),
            "evals": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows}}
  out_dir = workdir or (os.path.dirname(weights.path) if weights.kind == "checkpoint" else None)
  if jax.process_index() == 0:
    print(format_table(rows), flush=True)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      path = os.path.join(out_dir, RESULTS_FILE)
      with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
      os.replace(f"{path}.tmp", path)
      log.info("wrote %s", path)
    else:
      log.info("no --workdir: results not written to a file")
  return report
