"""Does effvit's evaluator predict what timm predicts, on real ImageNet JPEGs?

  python tools/eval_timm_agreement.py [--models=pvt_v2_b0,twins_svt_small,resnest14d]
      [--images=../shared/data/imagenet-sample] [--limit=0] [--depths=full|reduced]
      [--data_dir=/tmp/effvit-imagenet-sample] [--batch=64]

Prepares an imagenet2012 validation split from the sample JPEGs (`prepare --val_images`: TFDS
labels every image with its own class), then for each model:
  reference  timm's model with perturbed random weights (tests/pyramid_helpers.perturb_torch:
             O(1) activations, attention far from uniform), calibrated on the first images
             (`calibrate`) so that predictions differ from image to image, run on images
             preprocessed as timm's eval transform does, written with PIL (torchvision's
             Resize / CenterCrop / ToTensor / Normalize at the model's crop_pct and
             interpolation)
  ours       the same weights converted with effvit.convert, evaluated by effvit.evaluate's
             Evaluator with the eval entry of the model's family config (configs/*.py)
and reports the top-1 agreement, the largest logit difference, the example counts of
`Evaluator.run` on 1 and 8 (simulated) devices with a batch size that does not divide the
dataset, and our eval images/s. Runs on CPU; XLA gets 8 simulated devices.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

MEAN, STD = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))
# Reduced depths (a quick check): SVT keeps 2 blocks per stage so it has LSA and GSA blocks.
REDUCED = {"pvt_v2_b0": dict(depths=(1, 1, 1, 1)), "twins_svt_small": dict(depths=(2, 2, 2, 2)),
           "resnest14d": {}}
FAMILY = {"pvt_v2": ("configs.pvt_v2", "pvt_v2_"), "twins": ("configs.twins", "twins_"),
          "resnest": ("configs.resnest", "")}


def pil_eval_transform(path: str, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
  """timm's eval transform as torchvision applies it to a PIL image; HWC float32."""
  from PIL import Image
  image = Image.open(path).convert("RGB")
  scale = math.floor(size / crop_pct)            # timm: floor(img_size / crop_pct)
  w, h = image.size                              # torchvision Resize(int): shorter side -> scale
  new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
  image = image.resize(new, {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation])
  top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
  image = image.crop((left, top, left + size, top + size))
  return ((np.asarray(image, np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def calibrate(tm, x) -> None:
  """Make a random-weight timm model's predictions depend on the image, in place.

  Random weights map every image to nearly the same features, so one or a few classes win
  everywhere. BatchNorm running statistics are set to those of the images `x` (NCHW), and the
  classifier bias to -W·mean(features), so logits measure how an image differs from the rest.
  """
  import torch
  norms = [m for m in tm.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  with torch.no_grad():
    if norms:
      for m in norms:
        m.reset_running_stats()
        m.momentum = None   # cumulative average: the statistics of exactly these images
      tm.train()
      tm(x)
      tm.eval()
    features = tm.forward_head(tm.forward_features(x), pre_logits=True)
    head = tm.get_classifier()
    head.bias.copy_(-head.weight @ features.mean(0))


def family_eval(name: str):
  """(model name, eval entry of the family config for `name`)."""
  for prefix, (module, strip) in FAMILY.items():
    if name.startswith(prefix):
      config = importlib.import_module(module).get_config(name[len(strip):])
      return config.evals.val
  raise ValueError(f"no family config for {name}")


def prepare_sample(images_dir: str, data_dir: str, limit: int = 0, step: int = 1) -> str:
  """imagenet2012 validation from images_dir (every `step`-th of its JPEGs, at most `limit`)."""
  import tensorflow_datasets as tfds
  from effvit.data import prepare
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if builder.is_prepared():
    return data_dir
  pairs = prepare.images_by_wnid(images_dir)[::step]
  pairs = pairs[:limit] if limit else pairs
  stand_in = os.path.join(data_dir, "downloads", "val-images")
  os.makedirs(stand_in, exist_ok=True)
  prepare.write_val_tar(pairs, os.path.join(stand_in, "ILSVRC2012_img_val.tar"))
  prepare.prepare("imagenet2012", data_dir, manual_dir=stand_in)
  return data_dir


def dataset_files(data_dir: str, images_dir: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(source JPEG, TFDS label, the JPEG's own class) of every example, in stored order.

  Examples are matched to files by their bytes (TFDS stores JPEGs unchanged), so the label
  check does not rely on the labels themselves.
  """
  import tensorflow_datasets as tfds
  from effvit.data import prepare
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  index = {w: i for i, w in enumerate(builder.info.features["label"].names)}
  by_bytes = {}
  for wnid, path in prepare.images_by_wnid(images_dir):
    with open(path, "rb") as f:
      by_bytes[f.read()] = (path, index[wnid])
  ds = builder.as_dataset(split="validation", shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  files, labels, classes = [], [], []
  for ex in tfds.as_numpy(ds):
    path, cls = by_bytes[ex["image"]]
    files.append(path)
    labels.append(int(ex["label"]))
    classes.append(cls)
  return files, np.array(labels), np.array(classes)


def compare(name: str, data_dir: str, images_dir: str, *, depths: str = "full", batch: int = 64,
            devices=(1, 8), run: bool = True, model_kwargs: dict | None = None,
            limit: int = 0) -> dict:
  """Agreement of effvit's Evaluator with timm + PIL for model `name`; see the module doc.

  Predictions come from `Evaluator.predict` on the first of `devices`; with `run`,
  `Evaluator.run` then counts the examples on each of them. `limit`: the first examples only.
  """
  import jax
  import torch
  from effvit.convert import from_torch_state_dict
  from effvit.evaluate import Evaluator
  from effvit.models import create_model
  from effvit.reference import timm_model
  from effvit.train import sharding
  from pyramid_helpers import perturb_torch

  kw = model_kwargs if model_kwargs is not None else (
      REDUCED.get(name, {}) if depths == "reduced" else {})
  cfg = family_eval(name)
  cfg.unlock()
  split = f"validation[:{limit}]" if limit else "validation"
  cfg.update(dataset="imagenet2012", split=split, data_dir=data_dir, batch_size=batch)
  files, labels, classes = dataset_files(data_dir, images_dir)
  if limit:   # a slice keeps the stored order
    files, labels, classes = files[:limit], labels[:limit], classes[:limit]
  n = len(files)

  def timm_inputs(paths):
    x = np.stack([pil_eval_transform(f, cfg.image_size, cfg.crop_pct, cfg.interpolation)
                  for f in paths])
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  tm = timm_model(name, **kw)
  perturb_torch(tm, seed=0)
  calibrate(tm, timm_inputs(files[:64])[1])
  sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
  model = create_model(name, **kw)
  variables = from_torch_state_dict(name, sd, **kw)

  result = dict(model=name, depths=depths, images=n, image_size=cfg.image_size,
                crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, batch=batch)
  mesh = {d: sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:d])
          for d in devices}
  ev = Evaluator("val", cfg, model, mesh[devices[0]], num_classes=1000)
  t = time.time()
  pred = ev.predict(variables)
  result["predict_seconds"] = time.time() - t
  result["examples_predicted"] = len(pred["logits"])
  assert (pred["label"] == labels).all(), "evaluation order differs from the stored order"
  result["labels_are_image_classes"] = int(np.sum(labels == classes))

  ref, pixel_diff, t = [], [], time.time()
  ours_tf = _our_images(cfg, data_dir)
  with torch.no_grad():
    for i in range(0, n, 16):
      x, xt = timm_inputs(files[i:i + 16])
      pixel_diff.append(np.abs(x - ours_tf[i:i + 16]) * STD * 255)
      ref.append(tm(xt).numpy())
  result["timm_seconds"] = time.time() - t
  ref = np.concatenate(ref)
  pixel_diff = np.concatenate(pixel_diff)
  ours = pred["logits"]
  top2 = np.sort(ref, axis=-1)[:, -2:]
  margin = top2[:, 1] - top2[:, 0]
  result.update(
      agreement=float(np.mean(ours.argmax(-1) == ref.argmax(-1))),
      disagreements=int(np.sum(ours.argmax(-1) != ref.argmax(-1))),
      max_abs_logit_diff=float(np.abs(ours - ref).max()),
      max_abs_logit=float(np.abs(ref).max()),
      median_top1_margin=float(np.median(margin)), min_top1_margin=float(margin.min()),
      near_ties=int(np.sum(margin < 1e-4)),   # where round-off could flip the top-1
      distinct_predictions=int(len(set(ref.argmax(-1).tolist()))),
      pixel_diff_mean=float(pixel_diff.mean()), pixel_diff_max=float(pixel_diff.max()),
      timm_top1=float(np.mean(ref.argmax(-1) == labels)))
  for d in devices if run else ():
    ev_d = ev if d == devices[0] else Evaluator("val", cfg, model, mesh[d], num_classes=1000)
    res = ev_d.run(variables)
    result[f"examples_{d}dev"] = res["val/examples"]
    result[f"top1_{d}dev"] = res["val/top1"]
    result[f"images_per_sec_{d}dev"] = res["val/images_per_sec"]
    result[f"compilations_{d}dev"] = ev_d._step._cache_size()
  return result


def _our_images(cfg, data_dir):
  """Our preprocessed images, in evaluation order (to measure the pixel difference)."""
  from effvit.data import pipeline
  _, batches = pipeline.eval_batches(cfg, local_batch_size=cfg.batch_size)
  return np.concatenate([b["image"][b["mask"]] for b in batches])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="pvt_v2_b0,twins_svt_small,resnest14d")
  parser.add_argument("--images", default=os.path.join(ROOT, "..", "shared", "data",
                                                       "imagenet-sample"))
  parser.add_argument("--data_dir", default="/tmp/effvit-imagenet-sample")
  parser.add_argument("--limit", type=int, default=0, help="use at most this many images")
  parser.add_argument("--depths", choices=("full", "reduced"), default="full")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--devices", default="1,8",
                      help="device counts to run on: predictions on the first, counts on each")
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)
  data_dir = prepare_sample(args.images, args.data_dir, args.limit)
  results = []
  for name in args.models.split(","):
    r = compare(name, data_dir, args.images, depths=args.depths, batch=args.batch,
                devices=tuple(int(d) for d in args.devices.split(",")))
    results.append(r)
    print(json.dumps(r), flush=True)
  print(f"{'model':18s} {'images':>6s} {'agree %':>8s} {'max|dlogit|':>11s} {'|logit|max':>10s} "
        f"{'ex 1dev':>7s} {'ex 8dev':>7s} {'img/s 1dev':>10s}")
  nan = float("nan")
  for r in results:
    print(f"{r['model']:18s} {r['images']:6d} {100 * r['agreement']:8.2f} "
          f"{r['max_abs_logit_diff']:11.2e} {r['max_abs_logit']:10.2f} "
          f"{r.get('examples_1dev', nan):7.0f} {r.get('examples_8dev', nan):7.0f} "
          f"{r.get('images_per_sec_1dev', nan):10.1f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
