"""TFDS + tf.data input pipelines: resumable training batches and exact, padded evaluation.

API
  dataset_info(name, split, data_dir=None) -> (num_classes, num_examples)
  train_iterator(input_cfg, *, local_batch_size, seed, start_step=0, process_index=0,
                 process_count=1) -> infinite iterator of {"image", "label"} numpy batches
  check_input_config(input_cfg) -> None, or the ConfigError train_iterator would raise
  eval_batches(eval_cfg, *, local_batch_size, process_index=0, process_count=1)
      -> (num_batches, re-iterable of {"image", "label", "mask"} numpy batches)
  default_input_config(), default_eval_config() -> ConfigDicts with every field below

input_cfg (training)
  dataset            TFDS name ("imagenet2012", "sklearn_digits", ...)
  split              TFDS split, slicing allowed ("train", "train[:99%]")
  data_dir           TFDS data dir; None: TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  image_size         output size (square)
  inception_crop     random resized crop; False: resize the whole image to image_size
  crop_scale         (min, max) area fraction of the random resized crop
  interpolation      resize filter, "bicubic" (DeiT) or "bilinear"
  flip               random horizontal flip
  randaug_num_ops    RandAugment ops per image
  randaug_magnitude  RandAugment magnitude on the paper's 0..10 scale; 0 disables RandAugment
  shuffle_buffer     examples in the shuffle buffer (encoded bytes: ~110 kB each for ImageNet)
  cache              keep the encoded examples in memory after the first epoch (the whole split
                     on every host with process_split="batch")
  process_split      how processes share the data, "batch" or "files" (see Hosts below)
  mean, std          per-channel normalisation, in 0..1 units
  prefetch           batches prepared ahead
eval_cfg
  dataset, split, data_dir, image_size, mean, std as above
  crop_pct           resize the shorter side to floor(image_size / crop_pct), then centre-crop
  interpolation      "bicubic" or "bilinear" (timm's per-model value, architectures.md §5)
  label_key          feature holding the label(s); "": the dataset's supervised label
                     (`real_label` for imagenet2012_real)
  multilabel         None: from the label feature (a Sequence of ClassLabel, as ReaL's, is a set
                     of labels per example, returned multi-hot)
  class_subset       how 1000-way logits map onto the dataset's classes; read by
                     effvit.evaluate, which documents the values ("auto" picks by dataset)

Output: "image" float32 [b, H, W, 3] normalised, "label" int32 [b] ([b, num_classes] bool
multi-hot for multilabel eval), "mask" bool [b] (eval).

Resumable order. The split is read in a fixed file order (files shuffled once with `seed`),
then each epoch e is shuffled with a buffer seeded by (seed, e). The example stream is the
concatenation of these epochs; global batch k is examples [k·B, (k+1)·B) of it (B = local batch
× process_count), so batches cross epoch boundaries and every epoch shows every example exactly
once. Augmentation draws come from a key derived from (seed, position in the stream). Batch k
is therefore a pure function of (seed, k) (tf.data's shuffles also read TF's global seed, which
effvit leaves unset: calling `tf.random.set_seed` changes the order, consistently).
`start_step=k` opens epoch k·B // n and skips k·B mod n examples of it. The skip reads those
records (at most one epoch, no decoding or augmentation: about the cost of reading that part
of the dataset from disk), as does the shuffle buffer of every epoch.

Hosts (`process_split`). "batch" (the default): every process reads the whole stream and keeps
(decodes, augments) only its block of every global batch, rows [i·b, (i+1)·b) for
process_index i, so the global batches, and the run, are the same on any number of processes;
each process reads every record (not decoding those of other hosts). "files": each process
reads only its own part of the split (`tfds.split_for_jax_process`, disjoint parts that
together cover it) as its own stream with its own local batches: a process reads 1/P of the
data, but the batches depend on the process count (resume with the same one).

The shuffle is a window of `shuffle_buffer` examples over the stored order (TFDS shuffles the
examples once when preparing); with a buffer at least the split size it is a full permutation.

Evaluation reads each host's part in order, appends masked zero examples and cuts the same
number of batches on every host (ceil(largest part / local_batch_size)), so each example is seen
exactly once and every host runs the same number of steps.

Datasets must be prepared in data_dir first; `sklearn_digits` is prepared automatically, and
anything else raises `DataError` saying how to prepare it (`python -m effvit.data.prepare`).
TensorFlow is kept off accelerators.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from ml_collections import config_dict

from effvit.data import digits, transforms
from effvit.errors import ConfigError, DataError, closest


def tf_on_cpu_only() -> None:
  """Hide GPUs from TensorFlow so JAX owns them (must run before TF initialises devices)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow was initialised with GPUs visible; it may take GPU memory.")


tf_on_cpu_only()

# Builders that prepare with no download, so first use prepares them.
_OFFLINE = {digits.NAME}
# Files each manually downloaded dataset needs in its manual dir (<data_dir>/downloads/manual/
# unless `prepare --manual_dir` says otherwise).
_MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_subset": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_real": ("ILSVRC2012_img_val.tar",),
    "imagenet2012_multilabel": ("ILSVRC2012_img_val.tar",),
}
IMAGENET_SITE = "https://image-net.org/download-images"
# Downloads that a pip package already holds, byte for byte (same checksum as TFDS records).
KNOWN_COPIES = {"real.json": "timm/data/_info/imagenet_real_labels.json"}


def default_input_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dataset="imagenet2012", split="train", data_dir=config_dict.placeholder(str),
      image_size=224, inception_crop=True, crop_scale=(0.08, 1.0), interpolation="bicubic",
      flip=True, randaug_num_ops=2, randaug_magnitude=9.0, shuffle_buffer=50_000, cache=False,
      mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD, prefetch=2,
      process_split="batch"))


def default_eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dataset="imagenet2012", split="validation", data_dir=config_dict.placeholder(str),
      image_size=224, crop_pct=0.875, interpolation="bicubic",
      mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD,
      label_key="", multilabel=config_dict.placeholder(bool), class_subset="auto"))


def qualified_name(builder: tfds.core.DatasetBuilder) -> str:
  """'imagenet_v2/threshold-0.7': the name with its config, as `tfds.builder` takes it."""
  config = builder.builder_config
  return f"{builder.name}/{config.name}" if config is not None else builder.name


def _alnum(text: str) -> str:
  return "".join(c for c in text.lower() if c.isalnum())


def downloads(builder: tfds.core.DatasetBuilder) -> list[tuple[str, str, str]]:
  """(url, file name, size) of each file preparing `builder` downloads, from TFDS's checksums.

  TFDS takes a file of that name from the manual dir instead of downloading it (after checking
  its checksum), which is how an offline machine prepares these datasets.
  """
  infos = [(url, info) for url, info in sorted((builder.url_infos or {}).items())
           if info.filename]
  config = builder.builder_config
  if config is not None and infos:
    # The checksums list the files of every config; keep this config's: imagenette configs
    # name their archive (`dirname`), imagenet_v2 / imagenet2012_subset ones are in the name.
    dirname = getattr(config, "dirname", None)
    if dirname:
      mine = [(u, i) for u, i in infos if i.filename.split(".")[0] == dirname]
    else:
      key = _alnum(config.name.replace("pct", "percent"))
      mine = [(u, i) for u, i in infos if key in _alnum(i.filename)]
    infos = mine or infos
  return [(url, info.filename, str(info.size)) for url, info in infos]


def _prepare_command(name: str, data_dir: str, *extra: str) -> str:
  return " ".join(["python -m effvit.data.prepare", name, f"--data_dir={data_dir}", *extra])


def _known_copy(filename: str) -> str:
  copy = KNOWN_COPIES.get(filename)
  return (f"; without internet access, prepare uses timm's identical copy "
          f"<site-packages>/{copy} when timm is installed") if copy else ""


def how_to_prepare(builder: tfds.core.DatasetBuilder, *extra: str) -> str:
  """The exact steps that prepare `builder`'s dataset in its data dir (one line)."""
  root, name = builder.data_dir_root, qualified_name(builder)
  manual = f"{root}/downloads/manual/"
  command = _prepare_command(name, root, *extra)
  files = downloads(builder)
  if builder.name in _MANUAL_FILES:
    need = " and ".join(_MANUAL_FILES[builder.name])
    text = f"put {need} (from {IMAGENET_SITE}, after registering)"
    for url, filename, _ in files:
      text += f" and {filename} (from {url}{_known_copy(filename)})"
    return f"{text} in {manual} and run `{command}`"
  if files:
    urls = ", ".join(f"{url} ({size})" for url, _, size in files)
    saved = " and ".join(f"{manual}{filename}" for _, filename, _ in files)
    return (f"run `{command}`, which downloads {urls}; a machine without internet access "
            f"cannot download: fetch the file elsewhere and save it as {saved} before running "
            f"the command (TFDS then reads it from there), or copy a prepared "
            f"{root}/{builder.name} from another machine")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return (f"download its files into {manual} (see "
            f"https://www.tensorflow.org/datasets/catalog/{builder.name}) and run `{command}`")
  return (f"run `{command}` on a machine with internet access (it downloads), "
          f"then copy {root}/{builder.name} here")


def _no_variant_warnings(record: logging.LogRecord) -> bool:
  # TFDS warns "Variant folder ... has no dataset_info.json" while it looks for a prepared
  # copy; an unprepared dataset is reported by load_builder (in one line) or prepared.
  return not record.getMessage().startswith("Variant folder ")


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; prepares offline builders; DataError for anything else."""
  absl_log = logging.getLogger("absl")
  absl_log.addFilter(_no_variant_warnings)
  try:
    return _load_builder(name, data_dir)
  finally:
    absl_log.removeFilter(_no_variant_warnings)


def _load_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split(":")[0].split("/")[0]
    names = sorted(set(tfds.list_builders(with_community_datasets=False)))
    raise DataError(f"unknown dataset {name!r}{closest(base, names)}") from None
  except (AssertionError, ValueError) as e:  # e.g. a version or config that does not exist
    raise DataError(f"dataset {name!r}: {_config_hint(name) or str(e).splitlines()[0]}") from None
  if builder.is_prepared():
    return builder
  if builder.name in _OFFLINE:
    try:
      builder.download_and_prepare()
    except Exception:  # another process may have prepared it at the same time
      if not tfds.builder(name, data_dir=data_dir).is_prepared():
        raise
    return tfds.builder(name, data_dir=data_dir)
  raise DataError(f"dataset {qualified_name(builder)} is not prepared in "
                  f"{builder.data_dir_root}: " + how_to_prepare(builder))


def _config_hint(name: str) -> str:
  """'has no config ...' with the builder's configs, when `name`'s config is the problem."""
  base, _, rest = name.split(":")[0].partition("/")
  config = rest.split("/")[0]
  try:
    configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
  except Exception:  # an unknown or broken builder: let TFDS's message speak
    return ""
  if not config or not configs or config in configs:
    return ""
  return (f"{base} has no config {config!r}{closest(config, configs)}; its configs: "
          f"{', '.join(configs)}")


def _num_examples(builder: tfds.core.DatasetBuilder, split, name: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    hint = ""
    if builder.name in _MANUAL_FILES:
      hint = "; to add a split, " + how_to_prepare(builder, "--regenerate")
    reason = str(e).strip("'\"").splitlines()[0]
    raise DataError(f"dataset {builder.name} has no split {name!r} ({reason}){hint}") from None


def _keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  return tuple(keys) if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys) \
      else ("image", "label")


def dataset_info(name: str, split: str, data_dir: str | None = None) -> tuple[int | None, int]:
  """(num_classes, num_examples) of a prepared split; num_classes None if labels are not classes."""
  builder = load_builder(name, data_dir)
  num_examples = _num_examples(builder, split, split)
  label = builder.info.features[_keys(builder)[1]]
  return getattr(label, "num_classes", None), num_examples


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """What an eval entry's label feature holds (from the dataset's TFDS feature metadata)."""
  key: str                 # feature name
  multilabel: bool         # a set of classes per example, delivered multi-hot
  num_classes: int
  names: tuple[str, ...]   # class names (ImageNet wnids for the ImageNet family)


def label_spec(builder: tfds.core.DatasetBuilder, label_key: str = "",
               multilabel: bool | None = None) -> LabelSpec:
  """The label feature of an eval entry: `label_key` ("" = supervised key), checked."""
  key = label_key or _keys(builder)[1]
  features = builder.info.features
  if key not in features:
    raise ConfigError(f"{qualified_name(builder)} has no feature {key!r} to use as label_key"
                      f"{closest(key, list(features.keys()))}")
  feature = features[key]
  is_set = isinstance(feature, tfds.features.Sequence)
  classes = feature.feature if is_set else feature
  if not isinstance(classes, tfds.features.ClassLabel):
    raise ConfigError(f"feature {key!r} of {qualified_name(builder)} is not a class label")
  if multilabel is False and is_set:
    raise ConfigError(f"feature {key!r} of {qualified_name(builder)} holds a set of labels per "
                      "example: evaluate it with multilabel=True, or pick a single-label feature "
                      f"with label_key ({', '.join(k for k in features.keys() if k != key)})")
  return LabelSpec(key, bool(multilabel) or is_set, classes.num_classes, tuple(classes.names))


def _base_split(split: str) -> str:
  """'test[:10%]' -> 'test'; the whole split, for properties of the dataset."""
  return split.split("[")[0].strip()


_PRESENT: dict[tuple, tuple[int, ...]] = {}


def present_classes(name: str, split: str, data_dir: str | None = None,
                    label_key: str = "") -> tuple[int, ...]:
  """Sorted classes that occur in the whole `split` (slicing ignored) of a prepared dataset.

  ImageNet-A and ImageNet-R store labels in the 1000 ImageNet classes but hold 200 of them.
  The set is read from the labels once (images are not decoded) and cached in memory and,
  where the data dir is writable, in <dataset dir>/effvit_classes-<split>-<key>.json.
  """
  builder = load_builder(name, data_dir)
  split, key = _base_split(split), label_spec(builder, label_key).key
  _num_examples(builder, split, split)
  cache_key = (builder.data_dir, split, key)
  if cache_key in _PRESENT:
    return _PRESENT[cache_key]
  path = os.path.join(builder.data_dir, f"effvit_classes-{split}-{key}.json")
  try:
    with open(path, encoding="utf-8") as f:
      classes = tuple(json.load(f))
  except (OSError, ValueError):
    ds = builder.as_dataset(split=split, decoders={_keys(builder)[0]: tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(try_autocache=False))
    labels = ds.map(lambda ex: tf.reshape(tf.cast(ex[key], tf.int32), [-1]),
                    num_parallel_calls=tf.data.AUTOTUNE)
    seen = np.zeros(label_spec(builder, label_key).num_classes, bool)
    for batch in labels.unbatch().batch(4096).as_numpy_iterator():
      seen[batch] = True
    classes = tuple(int(i) for i in np.flatnonzero(seen))
    try:  # atomic, so hosts writing at once leave a whole file
      tmp = f"{path}.tmp-{os.getpid()}"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(list(classes), f)
      os.replace(tmp, path)
    except OSError:
      pass
  _PRESENT[cache_key] = classes
  return classes


def _read(builder, split, image_key: str, label_key: str, *, shuffle_seed: int | None):
  """(encoded image, int32 label) pairs in a fixed order."""
  ds = builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
                                  skip_prefetch=True, try_autocache=False))
  return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))


def _check(cfg: ml_collections.ConfigDict, *fields: str) -> None:
  missing = [f for f in fields if f not in cfg]
  if missing:
    raise ConfigError(f"input config lacks {', '.join(missing)}: start from "
                      "effvit.data.default_input_config() / default_eval_config()")
  if cfg.interpolation not in transforms.INTERPOLATIONS:
    raise ConfigError(f"interpolation must be one of {transforms.INTERPOLATIONS}, "
                      f"got {cfg.interpolation!r}")


TRAIN_FIELDS = ("dataset", "split", "data_dir", "image_size", "inception_crop", "crop_scale",
                "interpolation", "flip", "randaug_num_ops", "randaug_magnitude",
                "shuffle_buffer", "cache", "mean", "std", "prefetch")


def check_input_config(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError for a training input config train_iterator would reject."""
  _check(cfg, *TRAIN_FIELDS)
  if cfg.get("process_split", "batch") not in ("batch", "files"):
    raise ConfigError(f"input.process_split={cfg.process_split!r}: choose 'batch' (the same "
                      "batches on any number of processes) or 'files'")


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # No autotuning thread: destroying an iterator waits for it, and it sleeps out its
  # optimization period (growing to 60 s) before it notices; runs hung that long at exit.
  # AUTOTUNE parallelism then means one call per usable core; prefetch depths are explicit.
  options.autotune.enabled = False
  return options


def train_iterator(input_cfg: ml_collections.ConfigDict, *, local_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This host's training batches from `start_step` on; see the module docstring."""
  cfg = input_cfg
  check_input_config(cfg)
  tf_on_cpu_only()
  builder = load_builder(cfg.dataset, cfg.data_dir)
  by_files = cfg.get("process_split", "batch") == "files" and process_count > 1
  # Own stream per host (by_files) or one global stream, sliced per host after the shuffle.
  index, count = (process_index, process_count) if by_files else (0, 1)
  split = tfds.split_for_jax_process(cfg.split, process_index=index, process_count=count)
  n = _num_examples(builder, split, cfg.split)
  if n == 0:
    raise DataError(f"{cfg.dataset} split {cfg.split!r} has no examples for process "
                    f"{process_index} of {process_count}")
  raw = _read(builder, split, *_keys(builder), shuffle_seed=seed % 2**31)
  if cfg.cache:
    raw = raw.cache()

  root = tf.constant([seed % 2**63, 0], tf.int64)
  shuffle_root = tf.random.experimental.stateless_fold_in(root, 1)
  example_root = tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(root, 2), index)

  def epoch(e):
    shuffle_seed = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(shuffle_root, e), minval=None, maxval=None,
        dtype=tf.int64)
    shuffled = raw.shuffle(cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, x: (x[0], x[1], e * n + i))

  randaugment = None
  if cfg.randaug_magnitude > 0 and cfg.randaug_num_ops > 0:
    from effvit.data.randaugment import RandAugment  # imports keras: only when needed
    randaugment = RandAugment(cfg.randaug_num_ops, cfg.randaug_magnitude)

  def preprocess(image_bytes, label, position):
    key = tf.random.experimental.stateless_fold_in(example_root, position)
    image = transforms.train_image(
        image_bytes, key, image_size=cfg.image_size, inception_crop=cfg.inception_crop,
        crop_scale=tuple(cfg.crop_scale), flip=cfg.flip, interpolation=cfg.interpolation,
        randaugment=randaugment, mean=tuple(cfg.mean), std=tuple(cfg.std))
    return {"image": image, "label": label}

  batch = local_batch_size * (process_count // count)   # of the stream this host reads
  first = start_step * batch
  ds = tf.data.Dataset.range(first // n, 2**62).flat_map(epoch).skip(first % n)
  if batch != local_batch_size:   # this process's rows of every global batch, before decoding
    ds = ds.filter(lambda image, label, position:
                   (position % batch) // local_batch_size == process_index)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(cfg.prefetch)
  return ds.with_options(_options()).as_numpy_iterator()


class _Batches:
  """Re-iterable numpy view of a finite tf.data pipeline (a fresh pass per `iter`)."""

  def __init__(self, ds: tf.data.Dataset, num_batches: int):
    self._ds, self._n = ds, num_batches

  def __len__(self) -> int:
    return self._n

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self._ds.as_numpy_iterator()


def eval_batches(eval_cfg: ml_collections.ConfigDict, *, local_batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> tuple[int, Any]:
  """(num_batches, batches) for this host; padded examples have mask False."""
  cfg = eval_cfg
  _check(cfg, "dataset", "split", "data_dir", "image_size", "crop_pct", "interpolation",
         "mean", "std")
  if not 0 < cfg.crop_pct <= 1:
    raise ConfigError(f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
  tf_on_cpu_only()
  builder = load_builder(cfg.dataset, cfg.data_dir)
  spec = label_spec(builder, cfg.get("label_key") or "", cfg.get("multilabel"))
  splits = [tfds.split_for_jax_process(cfg.split, process_index=i, process_count=process_count)
            for i in range(process_count)]
  counts = [_num_examples(builder, s, cfg.split) for s in splits]
  num_batches = math.ceil(max(counts) / local_batch_size)

  def label_of(ex):
    if not spec.multilabel:
      return tf.cast(ex[spec.key], tf.int32)
    labels = tf.reshape(tf.cast(ex[spec.key], tf.int32), [-1])   # may be empty
    return tf.math.bincount(labels, minlength=spec.num_classes, maxlength=spec.num_classes) > 0

  def preprocess(ex):
    image = transforms.eval_image(ex[image_key], image_size=cfg.image_size,
                                  crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                                  mean=tuple(cfg.mean), std=tuple(cfg.std))
    return {"image": image, "label": label_of(ex), "mask": tf.constant(True)}

  image_key = _keys(builder)[0]
  ds = builder.as_dataset(
      split=splits[process_index], shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(skip_prefetch=True, try_autocache=False))
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  size = cfg.image_size
  pad_label = (tf.zeros([spec.num_classes], tf.bool) if spec.multilabel
               else tf.constant(0, tf.int32))
  pad = {"image": tf.zeros([size, size, 3], tf.float32), "label": pad_label,
         "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.batch(local_batch_size, drop_remainder=True).take(num_batches).prefetch(2)
  return num_batches, _Batches(ds.with_options(_options()), num_batches)
