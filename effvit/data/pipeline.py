"""TFDS + tf.data input pipelines: resumable training batches and exact, padded evaluation.

API
  dataset_info(name, split, data_dir=None) -> (num_classes, num_examples)
  train_iterator(input_cfg, *, local_batch_size, seed, start_step=0, process_index=0,
                 process_count=1) -> infinite iterator of {"image", "label"} numpy batches
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
  cache              keep the encoded examples in memory after the first epoch
  mean, std          per-channel normalisation, in 0..1 units
  prefetch           batches prepared ahead
eval_cfg
  dataset, split, data_dir, image_size, mean, std as above
  crop_pct           resize the shorter side to floor(image_size / crop_pct), then centre-crop
  interpolation      "bicubic" or "bilinear" (timm's per-model value, architectures.md §5)

Output: "image" float32 [b, H, W, 3] normalised, "label" int32 [b], "mask" bool [b] (eval).

Resumable order. A host reads its own part of the split (`tfds.split_for_jax_process`, disjoint
parts that together cover the split) in a fixed file order (files shuffled once with `seed`),
then each epoch e is shuffled with a buffer seeded by (seed, e). The host's example stream is
the concatenation of these epochs; batch k is examples [k·b, (k+1)·b) of it, so batches cross
epoch boundaries and every epoch shows every example exactly once. Augmentation draws come from
a key derived from (seed, process_index, position in the stream). Batch k is therefore a pure
function of (seed, k) for a given process_count (tf.data's shuffles also read TF's global seed,
which effvit leaves unset: calling `tf.random.set_seed` changes the order, consistently).
`start_step=k` opens epoch k·b // n and skips k·b mod n examples of it. The skip
reads those records (at most one epoch, no decoding or augmentation: about the cost of reading
that part of the dataset from disk), as does the shuffle buffer of every epoch.

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

import logging
import math
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
# Files each manually downloaded dataset needs in <data_dir>/downloads/manual/.
_MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_subset": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_real": ("ILSVRC2012_img_val.tar",),
    "imagenet2012_multilabel": ("ILSVRC2012_img_val.tar",),
}


def default_input_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dataset="imagenet2012", split="train", data_dir=config_dict.placeholder(str),
      image_size=224, inception_crop=True, crop_scale=(0.08, 1.0), interpolation="bicubic",
      flip=True, randaug_num_ops=2, randaug_magnitude=9.0, shuffle_buffer=50_000, cache=False,
      mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD, prefetch=2))


def default_eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dataset="imagenet2012", split="validation", data_dir=config_dict.placeholder(str),
      image_size=224, crop_pct=0.875, interpolation="bicubic",
      mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD))


def _prepare_command(name: str, data_dir: str, *extra: str) -> str:
  return " ".join(["python -m effvit.data.prepare", name, f"--data_dir={data_dir}", *extra])


def _how_to_prepare(builder: tfds.core.DatasetBuilder, *extra: str) -> str:
  root, name = builder.data_dir_root, builder.name
  command = _prepare_command(name, root, *extra)
  if name in _MANUAL_FILES:
    files = " and ".join(_MANUAL_FILES[name])
    return f"put {files} in {root}/downloads/manual/ and run `{command}`"
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return (f"download its files into {root}/downloads/manual/ (see "
            f"https://www.tensorflow.org/datasets/catalog/{name}) and run `{command}`")
  return (f"run `{command}` on a machine with internet access (it downloads), "
          f"then copy {root}/{name} here")


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; prepares offline builders; DataError for anything else."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split(":")[0].split("/")[0]
    names = sorted(set(tfds.list_builders(with_community_datasets=False)))
    raise DataError(f"unknown dataset {name!r}{closest(base, names)}") from None
  except (AssertionError, ValueError) as e:  # e.g. a version or config that does not exist
    raise DataError(f"dataset {name!r}: {str(e).splitlines()[0]}") from None
  if builder.is_prepared():
    return builder
  if builder.name in _OFFLINE:
    try:
      builder.download_and_prepare()
    except Exception:  # another process may have prepared it at the same time
      if not tfds.builder(name, data_dir=data_dir).is_prepared():
        raise
    return tfds.builder(name, data_dir=data_dir)
  raise DataError(f"dataset {builder.name} is not prepared in {builder.data_dir_root}: "
                  + _how_to_prepare(builder))


def _num_examples(builder: tfds.core.DatasetBuilder, split, name: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    hint = ""
    if builder.name in _MANUAL_FILES:
      hint = "; to add a split, " + _how_to_prepare(builder, "--regenerate")
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


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_iterator(input_cfg: ml_collections.ConfigDict, *, local_batch_size: int, seed: int,
                   start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This host's training batches from `start_step` on; see the module docstring."""
  cfg = input_cfg
  _check(cfg, "dataset", "split", "data_dir", "image_size", "inception_crop", "crop_scale",
         "interpolation", "flip", "randaug_num_ops", "randaug_magnitude", "shuffle_buffer",
         "cache", "mean", "std", "prefetch")
  tf_on_cpu_only()
  builder = load_builder(cfg.dataset, cfg.data_dir)
  split = tfds.split_for_jax_process(cfg.split, process_index=process_index,
                                     process_count=process_count)
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
      tf.random.experimental.stateless_fold_in(root, 2), process_index)

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

  first = start_step * local_batch_size
  ds = tf.data.Dataset.range(first // n, 2**62).flat_map(epoch).skip(first % n)
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
  splits = [tfds.split_for_jax_process(cfg.split, process_index=i, process_count=process_count)
            for i in range(process_count)]
  counts = [_num_examples(builder, s, cfg.split) for s in splits]
  num_batches = math.ceil(max(counts) / local_batch_size)

  def preprocess(image_bytes, label):
    image = transforms.eval_image(image_bytes, image_size=cfg.image_size, crop_pct=cfg.crop_pct,
                                  interpolation=cfg.interpolation, mean=tuple(cfg.mean),
                                  std=tuple(cfg.std))
    return {"image": image, "label": label, "mask": tf.constant(True)}

  ds = _read(builder, splits[process_index], *_keys(builder), shuffle_seed=None)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  size = cfg.image_size
  pad = {"image": tf.zeros([size, size, 3], tf.float32), "label": tf.constant(0, tf.int32),
         "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.batch(local_batch_size, drop_remainder=True).take(num_batches).prefetch(2)
  return num_batches, _Batches(ds.with_options(_options()), num_batches)
