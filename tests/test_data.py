"""Input pipeline: digits builder, resumable training order, padded evaluation, Mixup/CutMix,
timm-exact eval preprocessing, preparation errors."""
import functools
import glob
import math
import os
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from run_helpers import write_imagenet_metadata
from effvit import data
from effvit.data import digits, transforms
from effvit.data.prepare import prepare
from effvit.errors import ConfigError, DataError

MEAN, STD = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  data.load_builder("sklearn_digits", path)  # prepares on first use
  return path


@pytest.fixture(scope="module")
def digits_examples(digits_dir):
  """split -> {uint8 image bytes: label} of the prepared dataset."""
  builder = tfds.builder("sklearn_digits", data_dir=digits_dir)
  return {split: {ex["image"].tobytes(): int(ex["label"])
                  for ex in tfds.as_numpy(builder.as_dataset(split=split))}
          for split in ("train", "test")}


def _with(cfg, **overrides):
  cfg.update(**overrides)
  return cfg


def digits_cfg(data_dir, **overrides):
  cfg = data.default_input_config()
  cfg.update(dataset="sklearn_digits", data_dir=data_dir, image_size=32, crop_scale=(0.35, 1.0),
             shuffle_buffer=2000, **overrides)
  return cfg


def plain_cfg(data_dir, **overrides):
  """No augmentation: a 32x32 digit comes out exactly as stored, only normalised."""
  return digits_cfg(data_dir, inception_crop=False, flip=False, randaug_magnitude=0, **overrides)


def to_uint8(images):
  pixels = (images * STD + MEAN) * 255
  assert np.abs(pixels - np.rint(pixels)).max() < 1e-3  # normalised with exactly mean/std
  return np.rint(pixels).astype(np.uint8)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def seen(batches):
  """(image bytes, label) of every example in the batches (mask respected)."""
  out = []
  for b in batches:
    mask = b.get("mask", np.ones(len(b["label"]), bool))
    out += [(img.tobytes(), int(y)) for img, y in zip(to_uint8(b["image"][mask]), b["label"][mask])]
  return out


# ------------------------------------------------------------------------------- digits builder

def test_stepping_a_model_does_not_import_tensorflow():
  """The train step and the benchmarks run where TensorFlow is not installed (the GPU image of
  benchmarks/README.md); only the pipeline's names load it."""
  code = ("import sys; import effvit.data, effvit.train.state, effvit.benchmark_utils, "
          "effvit.models; assert 'tensorflow' not in sys.modules, 'imported'; "
          "effvit.data.train_iterator; assert 'tensorflow' in sys.modules, 'not loaded'; "
          "assert effvit.data.digits.NAME == 'sklearn_digits'")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
    data.nonexistent  # noqa: B018


def test_digits_builder_prepares_offline_with_documented_split(digits_dir, digits_examples):
  builder = tfds.builder("sklearn_digits", data_dir=digits_dir)
  assert builder.is_prepared()
  assert data.dataset_info("sklearn_digits", "train", digits_dir) == (10, 1500)
  assert data.dataset_info("sklearn_digits", "test", digits_dir) == (10, 297)
  assert builder.info.features["image"].shape == (32, 32, 3)
  assert builder.info.features["image"].np_dtype == np.uint8
  from sklearn.datasets import load_digits
  raw = load_digits()
  # test = the last 297 images in scikit-learn's order, stored as documented.
  expected = {digits.to_rgb32(img).tobytes(): int(y)
              for img, y in zip(raw.images[1500:], raw.target[1500:])}
  assert digits_examples["test"] == expected
  assert set(digits_examples["train"].values()) == set(range(10))
  img = digits.to_rgb32(raw.images[0])
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.max() > 200
  assert np.array_equal(img[..., 0], img[..., 2])


# ------------------------------------------------------------------------------ train iterator

def test_train_batches_shapes_dtypes_normalisation(digits_dir, digits_examples):
  batch = next(data.train_iterator(plain_cfg(digits_dir), local_batch_size=16, seed=0))
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  # Un-normalising gives back stored digits with their labels.
  for key, label in seen([batch]):
    assert digits_examples["train"][key] == label

  aug = next(data.train_iterator(digits_cfg(digits_dir), local_batch_size=16, seed=0))
  assert aug["image"].shape == (16, 32, 32, 3) and np.isfinite(aug["image"]).all()
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert (aug["image"] >= lo - 1e-5).all() and (aug["image"] <= hi + 1e-5).all()


@pytest.mark.parametrize("cache", [False, True])
def test_train_epochs_show_each_example_once(digits_dir, digits_examples, cache):
  cfg = plain_cfg(digits_dir, cache=cache)
  batches = take(data.train_iterator(cfg, local_batch_size=100, seed=1), 30)
  epoch0, epoch1 = seen(batches[:15]), seen(batches[15:])
  assert sorted(epoch0) == sorted(digits_examples["train"].items())
  assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # reshuffled per epoch
  if cache:  # the cache changes nothing in the order
    uncached = take(data.train_iterator(plain_cfg(digits_dir), local_batch_size=100, seed=1), 30)
    assert seen(uncached) == epoch0 + epoch1


def test_train_order_is_a_function_of_seed_and_step(digits_dir):
  cfg = digits_cfg(digits_dir, split="train[:500]")  # crop + flip + RandAugment, parallel map
  it = functools.partial(data.train_iterator, cfg, local_batch_size=64, seed=5)
  reference = take(it(), 9)
  again = take(it(), 2)
  for a, b in zip(again, reference):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # The order depends on the seed (checked without augmentation: quicker to build).
  plain = plain_cfg(digits_dir, split="train[:500]")
  assert not np.array_equal(next(data.train_iterator(plain, local_batch_size=64, seed=6))["label"],
                            reference[0]["label"])
  # 500 examples: step 7 holds examples 448..511 (across the epoch boundary), step 8 starts
  # inside epoch 1.
  for k in (7, 8):
    resumed = next(it(start_step=k))
    np.testing.assert_array_equal(resumed["image"], reference[k]["image"])
    np.testing.assert_array_equal(resumed["label"], reference[k]["label"])


def test_train_hosts_read_disjoint_parts_covering_the_split(digits_dir, digits_examples):
  parts = []
  for index in range(2):
    it = data.train_iterator(plain_cfg(digits_dir), local_batch_size=50, seed=0,
                             process_index=index, process_count=2)
    parts.append(seen(take(it, 15)))  # 750 examples: one epoch of this host's half
  assert len(set(parts[0])) == len(set(parts[1])) == 750
  assert not set(parts[0]) & set(parts[1])
  assert set(parts[0]) | set(parts[1]) == set(digits_examples["train"].items())


# ------------------------------------------------------------------------------------- eval

@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_once(digits_dir, digits_examples, process_count):
  cfg = data.default_eval_config()
  cfg.update(dataset="sklearn_digits", split="test", data_dir=digits_dir, image_size=32,
             crop_pct=1.0)
  hosts = [data.eval_batches(cfg, local_batch_size=40, process_index=i,
                             process_count=process_count) for i in range(process_count)]
  per_host = math.ceil(297 / process_count)
  assert {n for n, _ in hosts} == {math.ceil(per_host / 40)}
  examples, total_mask = [], 0
  for n, batches in hosts:
    batches = list(batches)
    assert len(batches) == n
    for b in batches:
      assert b["image"].shape == (40, 32, 32, 3) and b["mask"].dtype == bool
      assert not b["image"][~b["mask"]].any()  # padding is zeros
    total_mask += sum(int(b["mask"].sum()) for b in batches)
    examples += seen(batches)
  assert total_mask == 297
  assert sorted(examples) == sorted(digits_examples["test"].items())


def _pil_eval(path, size, crop_pct, interpolation):
  """timm's eval transform written with PIL, as torchvision applies it."""
  image = Image.open(path).convert("RGB")
  scale = int(size / crop_pct)
  w, h = image.size
  new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
  image = image.resize(new, {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation])
  top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
  image = image.crop((left, top, left + size, top + size))
  return (np.asarray(image, np.float32) / 255.0 - MEAN) / STD


@pytest.mark.parametrize("size,crop_pct,interpolation",
                         [(224, 0.9, "bicubic"), (224, 0.875, "bilinear"), (96, 0.875, "bicubic")])
def test_eval_preprocessing_matches_pil(imagenet_sample, size, crop_pct, interpolation):
  files = sorted(glob.glob(str(imagenet_sample / "*.JPEG")))[::125]
  for path in files:
    encoded = tf.io.read_file(path)
    np.testing.assert_array_equal(transforms.decode(encoded).numpy(),
                                  np.asarray(Image.open(path).convert("RGB")))
    ours = transforms.eval_image(encoded, image_size=size, crop_pct=crop_pct,
                                 interpolation=interpolation).numpy()
    diff = np.abs(ours - _pil_eval(path, size, crop_pct, interpolation)) * STD * 255
    assert ours.shape == (size, size, 3)
    assert diff.mean() < 0.3, (path, diff.mean())  # grey levels; PIL rounds between passes


# ----------------------------------------------------------------------------- mixup / cutmix

# Jitted once: op-by-op JAX would compile every small op separately.
mix = jax.jit(data.mixup_cutmix, static_argnums=3, static_argnames=(
    "mixup_alpha", "cutmix_alpha", "switch_prob", "label_smoothing"))


def _batch(n=8, size=16, num_classes=10):
  images = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[:, None, None, None],
                            (n, size, size, 3))
  labels = jnp.arange(n) % num_classes
  return images, labels


def test_mixup_cutmix_off_gives_smoothed_one_hot():
  images, labels = _batch()
  out, targets = mix(jax.random.key(0), images, labels, 10, label_smoothing=0.1)
  np.testing.assert_array_equal(out, images)
  expected = np.full((8, 10), 0.01)
  expected[np.arange(8), np.asarray(labels)] = 0.91
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_cutmix_lambda_is_the_kept_area():
  images, labels = _batch()
  partner_value = images[::-1, 0, 0, 0]
  lams = set()
  for seed in range(20):
    out, targets = mix(jax.random.key(seed), images, labels, 10, cutmix_alpha=1.0)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    kept = np.mean(np.asarray(out[..., 0]) == np.asarray(images[:, :1, :1, 0]), axis=(1, 2))
    pasted = np.mean(np.asarray(out[..., 0]) == np.asarray(partner_value)[:, None, None],
                     axis=(1, 2))
    np.testing.assert_allclose(kept + pasted, 1.0)
    lam = np.asarray(targets)[np.arange(8), np.asarray(labels)]
    np.testing.assert_allclose(lam, kept, atol=1e-6)
    lams.add(round(float(lam[0]), 4))
  assert len(lams) > 5  # λ really varies with the key


def test_mixup_mixes_images_and_targets_with_one_lambda():
  images, labels = _batch()
  out, targets = mix(jax.random.key(3), images, labels, 10, mixup_alpha=0.8, label_smoothing=0.1)
  lam = (np.asarray(out[:, 0, 0, 0]) - np.asarray(images[::-1, 0, 0, 0])) / \
        (np.asarray(images[:, 0, 0, 0]) - np.asarray(images[::-1, 0, 0, 0]))
  assert np.ptp(lam) < 1e-5 and 0 < lam[0] < 1
  y = np.asarray(data.smooth_one_hot(labels, 10, 0.1))
  np.testing.assert_allclose(targets, lam[0] * y + (1 - lam[0]) * y[::-1], atol=1e-5)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_mixup_cutmix_jits_on_a_sharded_batch():
  images, labels = _batch(n=8)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
  for seed in range(2):
    key = jax.random.key(seed)
    out, targets = mix(key, jax.device_put(images, sharding), jax.device_put(labels, sharding),
                       10, **kw)
    ref_out, ref_targets = mix(key, images, labels, 10, **kw)  # on one device
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(targets, ref_targets, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------- RandAugment

def test_randaugment_is_keras_result_and_per_example_deterministic():
  import keras
  from effvit.data import randaugment as ra_lib
  ra = ra_lib.RandAugment(num_ops=2, magnitude=9)
  image = tf.constant(np.random.RandomState(0).randint(0, 256, (24, 24, 3)), tf.float32)

  def ours(i):
    return ra(image, tf.stack([i, 7]))

  def keras_dispatch(i):  # keras' own compute-all-ops-then-select, same draws
    layer = ra._layer
    layer._key_holder.seed = ra_lib._KeySeed(tf.stack([i, 7]))
    t = layer.get_random_transformation(image, training=True)
    out = keras.layers.RandAugment.transform_images(layer, image[None], t)[0]
    return tf.clip_by_value(out, 0, 255)

  a = np.stack(list(tf.data.Dataset.range(40).map(ours, num_parallel_calls=2).as_numpy_iterator()))
  b = np.stack(list(tf.data.Dataset.range(40).map(keras_dispatch).as_numpy_iterator()))
  c = np.stack(list(tf.data.Dataset.range(40).map(ours).as_numpy_iterator()))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  assert len({x.tobytes() for x in a}) == 40  # every key gives its own augmentation
  assert (np.abs(a - image.numpy()).mean((1, 2, 3)) > 0).all()


# --------------------------------------------------------------------- preparation and errors

def test_unprepared_imagenet_says_how_to_prepare(tmp_path):
  with pytest.raises(DataError) as e:
    data.dataset_info("imagenet2012", "validation", str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert f"{tmp_path}/downloads/manual/" in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert f"python -m effvit.data.prepare imagenet2012 --data_dir={tmp_path}" in message


def test_unknown_dataset_and_split_are_data_errors(digits_dir):
  with pytest.raises(DataError, match="imagenet2012"):
    data.dataset_info("imagenet2021", "train")
  with pytest.raises(DataError, match=r"no split 'validation' .*'train', 'test'"):
    data.dataset_info("sklearn_digits", "validation", digits_dir)
  with pytest.raises(ConfigError, match="interpolation"):
    data.eval_batches(_with(data.default_eval_config(), dataset="sklearn_digits",
                            data_dir=digits_dir, interpolation="lanczos"), local_batch_size=8)


def test_imagenet_prepared_from_real_jpegs(imagenet_sample, tmp_path):
  """The instruction in the error works, and evaluation reproduces PIL on the stored JPEGs."""
  files = sorted(glob.glob(str(imagenet_sample / "*.JPEG")))[:5]
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
    for i, path in enumerate(files):  # labels come from the builder's list, by file name
      tar.add(path, arcname=f"ILSVRC2012_val_{i + 1:08d}.JPEG")
  with pytest.raises(DataError, match="not prepared"):
    data.dataset_info("imagenet2012", "validation", str(tmp_path))
  prepare("imagenet2012", str(tmp_path))
  assert data.dataset_info("imagenet2012", "validation", str(tmp_path)) == (1000, 5)
  with pytest.raises(DataError, match="no split 'train'.*ILSVRC2012_img_train.tar"):
    data.dataset_info("imagenet2012", "train", str(tmp_path))

  cfg = _with(data.default_eval_config(), data_dir=str(tmp_path), image_size=64, crop_pct=0.9)
  references = [_pil_eval(f, 64, 0.9, "bicubic") for f in files]
  matched = []
  for index in range(2):
    n, batches = data.eval_batches(cfg, local_batch_size=2, process_index=index, process_count=2)
    assert n == 2
    for b in batches:
      for image in b["image"][b["mask"]]:
        diffs = [np.abs(image - r).mean() for r in references]
        assert min(diffs) * 255 * STD.mean() < 0.3
        matched.append(int(np.argmin(diffs)))
  assert sorted(matched) == list(range(5))


@pytest.fixture
def mock_imagenet(tmp_path):
  """imagenet2012 under tfds.testing.mock_data: metadata with 16 train / 16 validation examples
  (mock_data yields `num_examples` noise JPEGs of random sizes for any split)."""
  write_imagenet_metadata(str(tmp_path))
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path)):
    yield str(tmp_path)


def test_imagenet_shaped_pipeline_on_mock_data(mock_imagenet):
  cfg = _with(data.default_input_config(), data_dir=mock_imagenet, shuffle_buffer=16)
  batches = take(data.train_iterator(cfg, local_batch_size=8, seed=0), 3)
  for b in batches:
    assert b["image"].shape == (8, 224, 224, 3) and b["image"].dtype == np.float32
    assert np.isfinite(b["image"]).all() and b["image"].std() > 0.1
    assert b["label"].dtype == np.int32 and ((0 <= b["label"]) & (b["label"] < 1000)).all()

  ecfg = _with(data.default_eval_config(), data_dir=mock_imagenet, crop_pct=0.9)
  n, eval_batches = data.eval_batches(ecfg, local_batch_size=6)
  eval_batches = list(eval_batches)
  assert n == 3 == len(eval_batches)
  assert sum(int(b["mask"].sum()) for b in eval_batches) == 16
  assert eval_batches[0]["image"].shape == (6, 224, 224, 3)


def test_default_configs_have_every_field():
  assert set(data.default_input_config().keys()) == {
      "dataset", "split", "data_dir", "image_size", "inception_crop", "crop_scale",
      "interpolation", "flip", "randaug_num_ops", "randaug_magnitude", "shuffle_buffer", "cache",
      "mean", "std", "prefetch", "process_split"}
  assert set(data.default_eval_config().keys()) == {
      "dataset", "split", "data_dir", "image_size", "crop_pct", "interpolation", "mean", "std",
      "label_key", "multilabel", "class_subset"}
  cfg = data.default_input_config()
  cfg.data_dir = "/somewhere"  # a placeholder(str): settable from the command line
  assert cfg.data_dir == "/somewhere"
