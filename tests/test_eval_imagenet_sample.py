"""Evaluation on real ImageNet JPEGs (../shared/data/imagenet-sample, skipped when absent).

An imagenet2012 validation split is prepared from a subset of the sample with
`python -m effvit.data.prepare imagenet2012 --val_images=...`; TFDS must label every image with
its own class, our evaluation images must equal timm's PIL transform of the JPEG exactly, and
converted timm models (perturbed random weights, reduced depth) evaluated by effvit must
predict what timm predicts. tools/eval_timm_agreement.py runs the same on all 1000 images at
full depth.
"""
import json
import os
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from effvit import data
from effvit.data import prepare
from effvit.evaluate import Evaluator
from effvit.train import sharding

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import eval_timm_agreement as agreement  # noqa: E402
from pyramid_helpers import torch_1thread  # noqa: E402,F401  (fixture)

STEP = 42           # every 42nd image of the 1000: 24 classes spread over the label space
BATCH = 16          # 8 devices x 2; does not divide 24
N = 24


@pytest.fixture(scope="module")
def subset(imagenet_sample, tmp_path_factory):
  """(images dir, data dir) with imagenet2012 prepared from every STEP-th sample image."""
  root = tmp_path_factory.mktemp("sample")
  images = root / "images"
  images.mkdir()
  for _, path in prepare.images_by_wnid(str(imagenet_sample))[::STEP]:
    os.symlink(path, images / os.path.basename(path))
  data_dir = str(root / "tfds")
  assert prepare.main(["imagenet2012", f"--val_images={images}", f"--data_dir={data_dir}"]) == 0
  return str(images), data_dir


def test_every_image_gets_its_own_class(subset):
  images, data_dir = subset
  files, labels, classes = agreement.dataset_files(data_dir, images)
  assert len(files) == len(os.listdir(images)) == N
  np.testing.assert_array_equal(labels, classes)


@pytest.mark.parametrize("crop_pct,interpolation", [(0.9, "bicubic"), (0.875, "bilinear")])
def test_eval_images_equal_timm_pil_transform(subset, crop_pct, interpolation):
  images, data_dir = subset
  files, _, _ = agreement.dataset_files(data_dir, images)
  cfg = data.default_eval_config()
  cfg.update(data_dir=data_dir, crop_pct=crop_pct, interpolation=interpolation)
  cfg.batch_size = BATCH
  ours = agreement._our_images(cfg, data_dir)
  assert len(ours) == len(files)
  for image, path in zip(ours, files):
    ref = agreement.pil_eval_transform(path, 224, crop_pct, interpolation)
    np.testing.assert_allclose(image, ref, atol=2e-6, err_msg=path)   # float32 round-off only


# A transformer (bicubic, crop 0.9) on 8 devices, so each gets a padded last batch, and a
# BatchNorm CNN (bilinear, crop 0.875) on 1; reduced depth keeps it cheap.
# tools/eval_timm_agreement.py runs all 1000 images at full depth, twins_svt_small included.
@pytest.mark.parametrize("name,kw,devices", [("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 8),
                                             ("resnest14d", {}, 1)])
def test_predictions_agree_with_timm(subset, torch_1thread, name, kw, devices):
  images, data_dir = subset
  if len(jax.devices()) < devices:
    pytest.skip(f"needs {devices} devices (tests/conftest.py asks XLA for 8)")
  r = agreement.compare(name, data_dir, images, batch=BATCH, devices=(devices,), run=False,
                        model_kwargs=kw)
  assert r["examples_predicted"] == N
  assert r["pixel_diff_max"] < 1e-3                  # grey levels: the same pixels
  assert r["distinct_predictions"] >= 6              # predictions vary with the image
  assert r["max_abs_logit_diff"] < 1e-4
  assert r["agreement"] >= 0.99, r


def test_real_labels_of_the_sample(imagenet_sample, subset, tmp_path):
  """imagenet2012_real from the same JPEGs, its real.json taken from timm's identical copy."""
  if prepare._known_copy("real.json") is None:
    pytest.skip("timm (the `reference` extra) is not installed: no offline real.json")
  images, _ = subset
  data_dir = str(tmp_path / "tfds")
  assert prepare.main(["imagenet2012_real", f"--val_images={images}",
                       f"--data_dir={data_dir}"]) == 0
  with open(prepare._known_copy("real.json")) as f:
    real = json.load(f)            # ReaL labels of val image i at position i - 1
  builder = tfds.builder("imagenet2012_real", data_dir=data_dir)
  sets = {}
  for ex in tfds.as_numpy(builder.as_dataset(split="validation")):
    index = int(ex["file_name"].decode()[len("ILSVRC2012_val_"):-len(".JPEG")])
    assert sorted(ex["real_label"].tolist()) == sorted(real[index - 1])
    sets[index] = set(real[index - 1])
  assert len(sets) == N

  import flax.linen as nn

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(1000)(x.reshape(len(x), -1))

  cfg = data.default_eval_config()
  cfg.update(dataset="imagenet2012_real", data_dir=data_dir, image_size=16, crop_pct=1.0)
  cfg.batch_size = BATCH
  model = Linear()
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:8])
  ev = Evaluator("real", cfg, model, mesh, num_classes=1000)
  res = ev.run(variables)
  pred = ev.predict(variables)
  hot = pred["label"]
  assert sorted(map(len, sets.values())) == sorted(hot.sum(-1).tolist())
  kept = hot.any(-1)
  assert res["real/examples"] == sum(1 for s in sets.values() if s) == kept.sum()
  top1 = hot[np.arange(len(hot)), pred["logits"].argmax(-1)][kept].mean()
  assert res["real/top1"] == pytest.approx(top1)
