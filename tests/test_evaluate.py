"""Evaluation: exact counting on 1 and 8 devices, Pillow-exact preprocessing, the labels of each
ImageNet-family dataset (ReaL sets, ImageNet-A/R class subsets, Imagenette wnids) against
references built from the files the tests write, preparation messages, and eval.py.

Runs everywhere: datasets are the offline digits builder or tiny ImageNet-family datasets that
TFDS's own builders prepare from JPEGs written here (downloads redirected to local folders).
"""
import io
import json
import os
import subprocess
import sys
import tarfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from effvit import data
from effvit.data import pipeline, prepare, transforms
from effvit.errors import ConfigError, DataError
from effvit.evaluate import (Evaluator, Weights, evaluate, find_weights,
                             resolve_labels, restore_checkpoint)
from effvit.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
# Standard ImageNet-1k indices of a few classes (sorted-wnid order), written out independently
# of TFDS's labels.txt: the first seven classes and the ten Imagenette classes.
FIRST_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331",
               "n01498041"]
IMAGENETTE = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491,
              "n03028079": 497, "n03394916": 566, "n03417042": 569, "n03425413": 571,
              "n03445777": 574, "n03888257": 701}


def mesh_of(n):
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices (tests/conftest.py asks XLA for 8)")
  return sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:n])


def eval_cfg(dataset, split, data_dir, batch_size=8, **kw):
  cfg = data.default_eval_config()
  cfg.update(dataset=dataset, split=split, data_dir=data_dir, **kw)
  cfg.batch_size = batch_size
  return cfg


# ------------------------------------------------------------------------- exact counting

class Linear(nn.Module):
  """A cheap model whose logits depend on every pixel."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.num_classes)(x.reshape(len(x), -1))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  data.load_builder("sklearn_digits", path)
  return path


def digits_reference(data_dir):
  """The test split as TFDS stores it, normalised in numpy (same float32 ops as the pipeline)."""
  ds = tfds.builder("sklearn_digits", data_dir=data_dir).as_dataset(split="test")
  images, labels = zip(*[(ex["image"], ex["label"]) for ex in tfds.as_numpy(ds)])
  x = (np.stack(images).astype(np.float32) / np.float32(255.0) - MEAN.astype(np.float32)) \
      / STD.astype(np.float32)
  return x, np.array(labels)


@pytest.mark.parametrize("devices", [1, 8])
def test_every_example_counts_once_with_a_padded_last_batch(digits_dir, devices):
  model = Linear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # 297 examples, global batch 40: 7 full batches and one with 17 real examples.
  cfg = eval_cfg("sklearn_digits", "test", digits_dir, batch_size=40, image_size=32, crop_pct=1.0)
  ev = Evaluator("test", cfg, model, mesh_of(devices), num_classes=10)
  res = ev.run(variables)
  again = ev.run(variables)
  assert ev._step._cache_size() == 1   # one compilation for all batches and both runs

  x, labels = digits_reference(digits_dir)
  logits = np.asarray(model.apply(variables, x), np.float64)
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  assert res["test/examples"] == 297 == len(labels)
  assert res["test/top1"] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-9)
  assert res["test/top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1)), abs=1e-9)
  assert res["test/loss"] == pytest.approx(-np.mean(logp[np.arange(297), labels]), rel=1e-5)
  assert res["test/images_per_sec"] > 0
  for key in ("top1", "top5", "loss", "examples"):
    assert again[f"test/{key}"] == res[f"test/{key}"]
  pred = ev.predict(variables)   # the same examples in the stored order
  np.testing.assert_array_equal(pred["label"], labels)
  np.testing.assert_allclose(pred["logits"], logits, atol=1e-4)


def test_minival_style_slice_of_the_train_split(digits_dir):
  model = Linear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  cfg = eval_cfg("sklearn_digits", "train[99%:]", digits_dir, batch_size=16, image_size=32,
                 crop_pct=1.0)
  res = Evaluator("minival", cfg, model, mesh_of(8), num_classes=10).run(variables)
  builder = tfds.builder("sklearn_digits", data_dir=digits_dir)
  assert res["minival/examples"] == builder.info.splits["train[99%:]"].num_examples == 15


# ---------------------------------------------------------------- Pillow-exact preprocessing

def _pil_eval(image, size, crop_pct, interpolation):
  """timm's eval transform as torchvision applies it to a PIL image (Resize, CenterCrop)."""
  scale = int(size / crop_pct)
  w, h = image.size
  new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
  image = image.resize(new, {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation])
  top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


def _photo_like(rng, h, w):
  """Smooth shapes plus noise, so both smooth and sharp regions are resampled."""
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([np.sin(xx / (3 + c) + c) * np.cos(yy / (5 + 2 * c)) for c in range(3)], -1)
  image = 128 + 100 * base + rng.normal(0, 25, (h, w, 3))
  image[h // 3:h // 2, w // 4:w // 2] = rng.integers(0, 256, 3)   # a flat patch with hard edges
  return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_resize_equals_pillow_exactly(method):
  rng = np.random.default_rng(0)
  sizes = [((61, 97), (248, 300)), ((375, 500), (256, 341)), ((300, 200), (41, 33)),
           ((200, 300), (150, 95)), ((90, 40), (30, 70)), ((33, 251), (33, 96))]
  for (h, w), (oh, ow) in sizes:   # up, down, mixed; both pass orders Pillow 13 chooses
    image = _photo_like(rng, h, w)
    ref = np.asarray(Image.fromarray(image).resize(
        (ow, oh), {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[method]))
    ours = transforms.resize_like_pil(tf.constant(image), oh, ow, method).numpy()
    np.testing.assert_array_equal(ours, ref, err_msg=f"{(h, w)} -> {(oh, ow)}")


def test_eval_image_equals_timm_transform_on_jpeg_bytes():
  rng = np.random.default_rng(1)
  for (h, w), size, crop, method in [((333, 500), 224, 0.9, "bicubic"),
                                     ((500, 375), 224, 0.875, "bilinear"),
                                     ((180, 181), 96, 0.909, "bicubic")]:
    buffer = io.BytesIO()
    Image.fromarray(_photo_like(rng, h, w)).save(buffer, "JPEG", quality=90)
    ref = _pil_eval(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), size, crop, method)
    ours = transforms.eval_image(tf.constant(buffer.getvalue()), image_size=size, crop_pct=crop,
                                 interpolation=method).numpy()
    np.testing.assert_allclose(ours, (ref / 255.0 - MEAN) / STD, atol=2e-6)


# --------------------------------------------------------------- how TFDS labels each dataset

@pytest.mark.parametrize("name,key,multilabel,num_classes", [
    ("imagenet2012", "label", False, 1000), ("imagenet2012_subset/10pct", "label", False, 1000),
    ("imagenet_v2/matched-frequency", "label", False, 1000),
    ("imagenet_v2/threshold-0.7", "label", False, 1000),
    ("imagenet_v2/topimages", "label", False, 1000), ("imagenet_sketch", "label", False, 1000),
    ("imagenet_a", "label", False, 1000), ("imagenet_r", "label", False, 1000),
    ("imagenet2012_real", "real_label", True, 1000), ("imagenette/160px-v2", "label", False, 10)])
def test_tfds_label_features(tmp_path, name, key, multilabel, num_classes):
  from effvit.evaluate import imagenet_wnids
  spec = pipeline.label_spec(tfds.builder(name, data_dir=str(tmp_path)))
  assert (spec.key, spec.multilabel, spec.num_classes) == (key, multilabel, num_classes)
  wnids = imagenet_wnids()
  assert list(wnids[:7]) == FIRST_WNIDS and len(set(wnids)) == 1000
  if num_classes == 1000:
    assert spec.names == wnids            # labels index the ImageNet classes directly
  else:
    assert {n: wnids.index(n) for n in spec.names} == IMAGENETTE


# ------------------------------------------------------------------ missing-dataset messages

@pytest.mark.parametrize("name,split,needed,absent", [
    ("imagenet2012", "validation", ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                                    "image-net.org"], []),
    ("imagenet2012_real", "validation", ["ILSVRC2012_img_val.tar", "real.json",
                                         "timm/data/_info/imagenet_real_labels.json"], []),
    ("imagenet2012_subset/10pct", "train", ["ILSVRC2012_img_train.tar", "10percent.txt"],
     ["1percent.txt"]),
    ("imagenet_v2/threshold-0.7", "test", ["imagenetv2-threshold0.7.tar.gz",
                                           "without internet access"], ["matched-frequency"]),
    ("imagenet_v2/topimages", "test", ["imagenetv2-top-images.tar.gz"], ["threshold"]),
    ("imagenette/320px-v2", "validation", ["imagenette2-320.tgz"], ["imagenette2-160"]),
    ("imagenet_a", "test", ["imagenet-a.tar", "without internet access"], []),
    ("imagenet_r", "test", ["imagenet-r.tar"], []),
    ("imagenet_sketch", "test", ["ImageNet-Sketch.zip"], [])])
def test_missing_dataset_says_how_to_prepare_it(tmp_path, name, split, needed, absent):
  with pytest.raises(DataError) as e:
    data.dataset_info(name, split, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message and "not prepared" in message
  assert f"python -m effvit.data.prepare {name} --data_dir={tmp_path}" in message
  assert f"{tmp_path}/downloads/manual/" in message
  for text in needed:
    assert text in message, text
  for text in absent:
    assert text not in message, text


def test_unknown_config_names_the_configs(tmp_path):
  with pytest.raises(DataError, match="no config 'top-images' .did you mean: topimages"):
    data.dataset_info("imagenet_v2/top-images", "test", str(tmp_path))


# ------------------------------------------------------------------------- preparation checks

def _tar(path, names):
  with tarfile.open(path, "w") as tar:
    for name in names:
      payload = b"x"
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))


def _prepare(capsys, data_dir, name="imagenet2012"):
  """(exit code, stderr) of `python -m effvit.data.prepare NAME --data_dir=...`."""
  code = prepare.main([name, f"--data_dir={data_dir}"])
  return code, capsys.readouterr().err


def test_prepare_names_missing_misnamed_and_wrong_tars(tmp_path, capsys):
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  _tar(manual / "ILSVRC2012_img_train.tar", ["n01440764.tar"])
  code, err = _prepare(capsys, tmp_path)
  assert code == 2 and err.count("\n") == 1
  assert f"{manual}/ILSVRC2012_img_val.tar is missing" in err
  assert "even to prepare only the train split" in err

  _tar(manual / "ILSVRC2012_img_val (1).tar", ["ILSVRC2012_val_00000001.JPEG"])
  code, err = _prepare(capsys, tmp_path)
  assert f"ILSVRC2012_img_val (1).tar is misnamed: rename it to {manual}/ILSVRC2012_img_val.tar" \
      in err

  os.remove(manual / "ILSVRC2012_img_val (1).tar")
  (manual / "imagenet2012").mkdir()
  _tar(manual / "imagenet2012" / "ILSVRC2012_img_val.tar", ["ILSVRC2012_val_00000001.JPEG"])
  code, err = _prepare(capsys, tmp_path)
  assert "is in a sub-folder: move it to" in err

  # A train tar under the val name, and a gzip file under the train name.
  os.rename(manual / "ILSVRC2012_img_train.tar", manual / "ILSVRC2012_img_val.tar")
  with open(manual / "ILSVRC2012_img_train.tar", "wb") as f:
    f.write(b"\x1f\x8b" + bytes(100))
  code, err = _prepare(capsys, tmp_path)
  assert code == 2
  assert "ILSVRC2012_img_val.tar does not hold the validation JPEGs: its first entry " \
         "'n01440764.tar' looks like the train tar" in err
  assert "ILSVRC2012_img_train.tar is not an uncompressed tar" in err


def test_prepare_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(prepare, "_reachable", lambda url, timeout=5.0: False)
  code, err = _prepare(capsys, tmp_path, "imagenet_r")
  assert code == 2
  assert "cannot reach people.eecs.berkeley.edu (no internet access)" in err
  assert f"save it as {tmp_path}/downloads/manual/imagenet-r.tar" in err


# ------------------------------------------- ImageNet-family label handling, end to end
#
# Images are flat colours; the model reads the colour code c (10 levels per channel, so 1000
# codes) and returns row c of a fixed random table. Every expected number below is computed
# from the table, the codes and the labels this file writes.

LEVELS = 15 + 25 * np.arange(10)
TABLE = np.random.default_rng(0).standard_normal((1000, 1000)).astype(np.float32) * 3


class ColourCode(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    rgb = (x.mean((1, 2)) * jnp.asarray(STD, jnp.float32) + jnp.asarray(MEAN, jnp.float32)) * 255
    digit = jnp.clip(jnp.round((rgb - LEVELS[0]) / 25), 0, 9).astype(jnp.int32)
    return jnp.asarray(TABLE)[digit[:, 0] * 100 + digit[:, 1] * 10 + digit[:, 2]]


def _write_flat(path, code, size=(30, 22)):
  colour = tuple(int(LEVELS[d]) for d in (code // 100, code // 10 % 10, code % 10))
  Image.new("RGB", size, colour).save(path, "JPEG", quality=95)


def _expected(codes, labels, subset=None):
  """(top1, top5, loss) over examples: logits TABLE[code] restricted to `subset`."""
  subset = np.arange(1000) if subset is None else np.asarray(subset)
  logits = TABLE[np.asarray(codes)][:, subset].astype(np.float64)
  pos = np.searchsorted(subset, labels)
  order = np.argsort(-logits, axis=-1)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return (np.mean(order[:, 0] == pos), np.mean((order[:, :5] == pos[:, None]).any(-1)),
          -np.mean(logp[np.arange(len(pos)), pos]))


def _run(dataset, split, data_dir, batch_size=3, **kw):
  cfg = eval_cfg(dataset, split, data_dir, batch_size, image_size=16, crop_pct=1.0, **kw)
  ev = Evaluator("e", cfg, ColourCode(), mesh_of(1), num_classes=1000)
  return ev, ev.run({})


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
  """imagenet_a, imagenet_r and imagenette/160px-v2 prepared by TFDS from local folders."""
  root = tmp_path_factory.mktemp("family")
  src = root / "src"
  rng = np.random.default_rng(3)
  layout = {"imagenet_a": ("imagenet-a", FIRST_WNIDS[:6]), "imagenet_r": ("imagenet-r",
                                                                         FIRST_WNIDS[1:7])}
  truth = {}
  for name, (top, wnids) in layout.items():
    codes, labels = [], []
    for i, wnid in enumerate(wnids):
      os.makedirs(src / name / top / wnid)
      for j in range(2):
        code = int(rng.integers(1000))
        _write_flat(src / name / top / wnid / f"{i}_{j}.jpg", code)
        codes.append(code)
        labels.append(FIRST_WNIDS.index(wnid))
    truth[name] = (codes, labels)
  codes, labels = [], []
  for split in ("train", "val"):
    for wnid, index in list(IMAGENETTE.items())[:4]:
      os.makedirs(src / "imagenette" / "imagenette2-160" / split / wnid)
      code = int(rng.integers(1000))
      _write_flat(src / "imagenette" / "imagenette2-160" / split / wnid / f"{wnid}_1.JPEG", code)
      if split == "val":
        codes.append(code)
        labels.append(index)
  truth["imagenette/160px-v2"] = (codes, labels)

  data_dir = str(root / "tfds")
  with pytest.MonkeyPatch.context() as mp:
    for name in truth:   # the builders' downloads come from the local folders
      mp.setattr(tfds.download.DownloadManager, "download_and_extract",
                 lambda self, url, _d=str(src / name.split("/")[0]): _d)
      tfds.builder(name, data_dir=data_dir).download_and_prepare()
  return data_dir, truth


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_restrict_logits_to_the_classes_present(family_dir, name):
  data_dir, truth = family_dir
  codes, labels = truth[name]
  ev, res = _run(name, "test", data_dir)
  present = sorted(set(labels))                      # the classes the folders hold
  assert ev.labels.class_subset == "present"
  assert np.flatnonzero(ev.labels.class_mask).tolist() == present
  top1, top5, loss = _expected(codes, labels, present)
  assert res["e/examples"] == len(codes)
  assert (res["e/top1"], res["e/top5"]) == pytest.approx((top1, top5))
  assert res["e/loss"] == pytest.approx(loss, rel=1e-5)
  assert _expected(codes, labels)[0] != top1 or top1 == 0   # the restriction matters
  # A slice of the split still uses the classes of the whole split.
  sliced = resolve_labels("e", eval_cfg(name, "test[:3]", data_dir), 1000)
  assert np.flatnonzero(sliced.class_mask).tolist() == present
  # Without the restriction: plain 1000-way accuracy.
  _, res = _run(name, "test", data_dir, class_subset="none")
  assert res["e/top1"] == pytest.approx(_expected(codes, labels)[0])


def test_imagenette_labels_map_to_imagenet_classes(family_dir):
  data_dir, truth = family_dir
  codes, labels = truth["imagenette/160px-v2"]
  ev, res = _run("imagenette/160px-v2", "validation", data_dir)
  assert ev.labels.class_subset == "wnids"
  assert sorted(np.flatnonzero(ev.labels.class_mask)) == sorted(IMAGENETTE.values())
  top1, top5, loss = _expected(codes, labels, sorted(IMAGENETTE.values()))
  assert res["e/examples"] == 4
  assert (res["e/top1"], res["e/top5"]) == pytest.approx((top1, top5))
  assert res["e/loss"] == pytest.approx(loss, rel=1e-5)
  with pytest.raises(ConfigError, match="dataset has 10 classes, the model 1000"):
    _run("imagenette/160px-v2", "validation", data_dir, class_subset="none")


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
  """imagenet2012_real prepared by TFDS from a stand-in val tar and chosen ReaL label sets."""
  root = tmp_path_factory.mktemp("real")
  rng = np.random.default_rng(4)
  codes = [int(c) for c in rng.integers(0, 1000, 10)]
  preds = [int(np.argmax(TABLE[c])) for c in codes]
  second = [int(np.argsort(-TABLE[c])[2]) for c in codes]
  # Hit, hit among several, empty (left out), miss, top-5-only hit, empty, ...
  sets = [[preds[0]], [5, preds[1], 900], [], [(preds[3] + 1) % 1000], [second[4]], [],
          [preds[6]], [second[7], 3], [(preds[8] + 7) % 1000], [preds[9]]]
  images = []
  for i, code in enumerate(codes):
    path = root / f"img{i}.jpg"
    _write_flat(path, code)
    images.append((FIRST_WNIDS[i % 7], str(path)))
  manual = root / "manual"
  manual.mkdir()
  names = prepare.write_val_tar(images, str(manual / "ILSVRC2012_img_val.tar"))
  index = {path: i for i, (_, path) in enumerate(images)}
  real = {name: sets[index[path]] for name, path in names.items()}
  data_dir = str(root / "tfds")
  builder_cls = type(tfds.builder("imagenet2012_real", data_dir=data_dir))
  with pytest.MonkeyPatch.context() as mp:   # ReaL's real.json download, from `sets`
    mp.setattr(builder_cls, "_get_real_labels", lambda self, dl: real)
    tfds.builder("imagenet2012_real", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  originals = [FIRST_WNIDS.index(w) for w, _ in images]
  return data_dir, codes, sets, originals


def test_real_labels_are_sets_and_empty_sets_are_left_out(real_dir):
  data_dir, codes, sets, originals = real_dir
  ev, res = _run("imagenet2012_real", "validation", data_dir)
  assert ev.labels.multilabel and ev.labels.key == "real_label"
  kept = [i for i, s in enumerate(sets) if s]
  top1 = np.mean([np.argmax(TABLE[codes[i]]) in sets[i] for i in kept])
  top5 = np.mean([bool(set(np.argsort(-TABLE[codes[i]])[:5]) & set(sets[i])) for i in kept])
  logp = [TABLE[c].astype(np.float64) - np.log(np.exp(TABLE[c].astype(np.float64)).sum())
          for c in codes]
  loss = np.mean([-np.mean(logp[i][sets[i]]) for i in kept])
  assert res["e/examples"] == len(kept) == 8
  assert (res["e/top1"], res["e/top5"]) == pytest.approx((top1, top5))
  assert 0 < top1 < top5 < 1
  assert res["e/loss"] == pytest.approx(loss, rel=1e-5)
  # The ILSVRC label of the same images, through label_key.
  ev, res = _run("imagenet2012_real", "validation", data_dir, label_key="original_label")
  assert not ev.labels.multilabel and res["e/examples"] == 10
  assert res["e/top1"] == pytest.approx(_expected(codes, originals)[0])
  with pytest.raises(ConfigError, match="holds a set of labels"):
    _run("imagenet2012_real", "validation", data_dir, multilabel=False)


# ------------------------------------------------------------------------------------ eval.py

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_dir):
  """A quickstart run's workdir with one checkpoint (step 7): AdamW state and EMA params."""
  import functools
  import optax
  from configs import quickstart
  from effvit.models import create_model
  from effvit.train.checkpoint import Checkpointer
  from effvit.train.state import create_state
  config = quickstart.get_config()
  config.evals.test.update(data_dir=digits_dir, batch_size=40)
  workdir = str(tmp_path_factory.mktemp("run"))
  model = create_model(config.model_name, **config.model)
  # The train state's structure without compiling its init; random params, zero elsewhere.
  abstract = jax.eval_shape(functools.partial(
      create_state, model, optax.adamw(1e-3), image_shape=(1, 32, 32, 3), ema=True),
      jax.random.key(1))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  state = state.replace(
      params=jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype),
                          abstract.params),
      ema_params=jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype),
                              abstract.params))
  ckpt = Checkpointer(workdir)
  ckpt.save(7, state, {"step": 7})
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  return config, workdir, state


def test_eval_restores_params_only_and_reports(run_dir, tmp_path):
  config, workdir, state = run_dir
  weights = find_weights(config, workdir, None)
  assert (weights.kind, weights.step) == ("checkpoint", None)
  from effvit.evaluate import abstract_variables
  from effvit.models import create_model
  model = create_model(config.model_name, **config.model)
  target = abstract_variables(model, mesh_of(1), 32)
  restored, step = restore_checkpoint(weights, {**target, "ema_params": target["params"]})
  assert step == 7 and set(restored) == {"params", "ema_params"}   # no optimizer state
  for name in ("params", "ema_params"):
    for a, b in zip(jax.tree.leaves(restored[name]), jax.tree.leaves(getattr(state, name))):
      np.testing.assert_array_equal(a, b)

  ema = config.copy_and_resolve_references()
  ema.optimizer.ema_decay = 0.999   # a run with EMA: both weights are evaluated, as in training
  report = evaluate(ema, workdir)   # the newest checkpoint of the run
  assert report["step"] == 7 and report["weights"] == f"{workdir}/checkpoints/7"
  assert sorted(report["evals"]) == ["test", "test_ema"]
  row = report["evals"]["test"]
  assert (row["dataset"], row["split"], row["examples"]) == ("sklearn_digits", "test", 297)
  assert report["evals"]["test_ema"]["examples"] == 297
  assert report["evals"]["test_ema"]["loss"] != row["loss"]
  with open(os.path.join(workdir, "eval_results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))

  # The same weights as a PyTorch-named .safetensors file, through model_init.
  from safetensors.numpy import save_file
  from effvit.convert import to_torch_state_dict
  path = str(tmp_path / "weights.safetensors")
  # ascontiguousarray: safetensors.numpy writes a transposed view's buffer as if contiguous.
  sd = to_torch_state_dict(config.model_name, {"params": state.params})
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
  config = config.copy_and_resolve_references()
  config.model_init = path
  other = evaluate(config, str(tmp_path / "out"))
  assert other["step"] is None and other["weights"] == path
  for key in ("examples", "top1", "top5", "loss"):
    assert other["evals"]["test"][key] == pytest.approx(row[key], abs=1e-6)
  assert os.path.exists(tmp_path / "out" / "eval_results.json")


def test_eval_errors_are_one_line_config_errors(run_dir, tmp_path):
  config, workdir, _ = run_dir
  with pytest.raises(ConfigError, match="nothing to evaluate"):
    evaluate(config, str(tmp_path))
  with pytest.raises(ConfigError, match="does not exist"):
    evaluate(config, None, str(tmp_path / "missing"))
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    evaluate(config, None, str(tmp_path))
  with pytest.raises(ConfigError, match=r"no checkpoint step 8 .* \(steps: 7\)"):
    restore_checkpoint(Weights("checkpoint", f"{workdir}/checkpoints", 8), {})
  other = config.copy_and_resolve_references()
  other.model.sr_ratios = (2, 2, 1, 1)
  with pytest.raises(ConfigError, match=r"trained with model.sr_ratios=\[4, 2, 1, 1\]"):
    evaluate(other, workdir)


def test_eval_py_command_line(run_dir, tmp_path):
  config, workdir, _ = run_dir
  digits = config.evals.test.data_dir
  out = subprocess.run(
      [sys.executable, "eval.py", "--config=configs/quickstart.py",
       f"--checkpoint={workdir}/checkpoints/7", f"--workdir={tmp_path}",
       f"--config.evals.test.data_dir={digits}", "--config.evals.test.batch_size=40"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  header, row = out.stdout.strip().splitlines()[-2:]
  assert header.split() == ["eval", "dataset", "split", "examples", "top-1", "%", "top-5", "%",
                            "loss", "images/s"]
  assert row.split()[:4] == ["test", "sklearn_digits", "test", "297"]
  with open(tmp_path / "eval_results.json") as f:
    saved = json.load(f)
  assert saved["step"] == 7
  assert float(row.split()[4]) == pytest.approx(100 * saved["evals"]["test"]["top1"], abs=0.006)


def test_config_evals_shortcut_keeps_the_models_preprocessing():
  from configs import resnest
  c = resnest.get_config("resnest101e,evals=val+real+v2+a")
  assert sorted(c.evals) == ["a", "real", "v2", "val"]
  assert (c.evals.v2.dataset, c.evals.v2.split) == ("imagenet_v2/matched-frequency", "test")
  assert (c.evals.a.dataset, c.evals.a.split) == ("imagenet_a", "test")
  for e in c.evals.values():   # timm's resnest101e: 256 px, crop 0.875, bilinear
    assert (e.image_size, e.crop_pct, e.interpolation) == (256, 0.875, "bilinear")
    e.data_dir = "/data"       # still a typed placeholder, settable from the command line
  with pytest.raises(ValueError, match="did you mean: v2"):
    resnest.get_config("resnest14d,evals=vv2")
