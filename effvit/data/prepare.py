"""Prepare a TFDS dataset for effvit.

  python -m effvit.data.prepare NAME [--data_dir=DIR] [--manual_dir=DIR] [--regenerate]
  python -m effvit.data.prepare imagenet2012 --val_images=DIR --data_dir=DIR

NAME is a TFDS name with its config: imagenet2012, imagenet2012_real, imagenet2012_subset/1pct
(or /10pct), imagenet_v2/matched-frequency (or /threshold-0.7, /topimages), imagenette
(/320px-v2, ...), imagenet_a, imagenet_r, imagenet_sketch, ...

Manually downloaded files are read from --manual_dir (default <data_dir>/downloads/manual/):
  imagenet2012           ILSVRC2012_img_val.tar (validation) and/or ILSVRC2012_img_train.tar
                         (train; TFDS 4.9 reads the val tar's file list for it too, so both)
  imagenet2012_real      ILSVRC2012_img_val.tar and real.json
  imagenet2012_subset/*  both tars, and 1percent.txt or 10percent.txt
They are checked before TFDS runs: a missing file, one misnamed (case, extra extension, copy
suffix, a sub-folder) or a tar holding the wrong thing is reported by name.
Datasets TFDS downloads are prepared offline when their file is in the manual dir under the
name TFDS's checksums give it (imagenet-r.tar, imagenetv2-matched-frequency.tar.gz, ...);
TFDS verifies its checksum. A file that an installed package already holds byte for byte
(timm's copy of ReaL's real.json) is used when the manual dir lacks it.

--val_images=DIR prepares the validation split of imagenet2012 (or imagenet2012_real) from
JPEGs named <wnid>_*.JPEG, e.g. ../shared/data/imagenet-sample, through a stand-in
ILSVRC2012_img_val.tar (see `write_val_tar`); it needs an explicit --data_dir so a small stand-in
never takes the place of the real dataset in the default one.
--regenerate rebuilds a prepared dataset, e.g. to add a split.
"""
from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import logging
import os
import re
import shutil
import socket
import sys
import tarfile
import urllib.parse

import tensorflow_datasets as tfds

from effvit.data import pipeline
from effvit.data.pipeline import load_builder  # also registers effvit's own builders
from effvit.errors import DataError, EffvitError

log = logging.getLogger("effvit")

_VAL_MEMBER = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG$")
_TRAIN_MEMBER = re.compile(r"n\d{8}\.tar$")
# What a tar is, from the name of its first entry.
_WHAT_TAR = [(_VAL_MEMBER, "the validation tar (ILSVRC2012_img_val.tar)"),
             (_TRAIN_MEMBER, "the train tar (ILSVRC2012_img_train.tar)"),
             (re.compile(r"ILSVRC2012_test_\d{8}\.JPEG$"),
              "the test tar (ILSVRC2012_img_test.tar)"),
             (re.compile(r"n\d{8}_\d+\.JPEG$"), "a per-class train tar (n*.tar)")]


def _first_member(path: str) -> str | None:
  """Name of the tar's first entry (reads one header); None if it is no plain tar."""
  try:
    with tarfile.open(path, "r:") as tar:
      member = tar.next()
      return member.name if member is not None else ""
  except (tarfile.TarError, OSError):
    return None


def _describe(member: str) -> str:
  for pattern, what in _WHAT_TAR:
    if pattern.match(os.path.basename(member)):
      return what
  return "something else"


def _near_misses(manual_dir: str, filename: str) -> list[str]:
  """Files that look like `filename` under another name or in a sub-folder of manual_dir."""
  key = pipeline._alnum(filename.split(".")[0])
  found = []
  for path in sorted(glob.glob(os.path.join(manual_dir, "*")) +
                     glob.glob(os.path.join(manual_dir, "*", "*"))):
    name = os.path.basename(path)
    if os.path.isfile(path) and path != os.path.join(manual_dir, filename) and (
        name.lower() == filename.lower() or pipeline._alnum(name).startswith(key)):
      found.append(path)
  return found


def _missing(manual_dir: str, filename: str) -> str:
  """Why `filename` is not in manual_dir, with what to do about near misses."""
  target = os.path.join(manual_dir, filename)
  misses = _near_misses(manual_dir, filename)
  if not misses:
    return f"{target} is missing"
  hints = []
  for path in misses[:3]:
    if re.search(r"_t3\b", os.path.basename(path)):
      hints.append(f"{path} is the task-3 subset (dog classes), not the full set")
    elif os.path.dirname(path) != manual_dir.rstrip("/"):
      hints.append(f"{path} is in a sub-folder: move it to {target}")
    else:
      hints.append(f"{path} is misnamed: rename it to {target}")
  return f"{target} is missing ({'; '.join(hints)})"


def check_manual_files(name: str, manual_dir: str) -> None:
  """DataError naming each required ImageNet tar that is missing, misnamed or wrong."""
  base = name.split("/")[0]
  required = pipeline._MANUAL_FILES.get(base)
  if not required:
    return
  problems = []
  present = [f for f in required if os.path.isfile(os.path.join(manual_dir, f))]
  if base == "imagenet2012":
    # TFDS 4.9 prepares any split whose tar is present, but reads the val tar's file list for
    # every split: the val tar is required, the train tar optional.
    if "ILSVRC2012_img_val.tar" not in present:
      why = _missing(manual_dir, "ILSVRC2012_img_val.tar")
      if "ILSVRC2012_img_train.tar" in present:
        why += " (TFDS needs it even to prepare only the train split)"
      problems.append(why)
  else:
    problems += [_missing(manual_dir, f) for f in required if f not in present]
  expected = {"ILSVRC2012_img_val.tar": (_VAL_MEMBER, "the validation JPEGs"),
              "ILSVRC2012_img_train.tar": (_TRAIN_MEMBER, "the per-class tars n*.tar")}
  for filename in present:
    path = os.path.join(manual_dir, filename)
    member = _first_member(path)
    if member is None:
      problems.append(f"{path} is not an uncompressed tar (a truncated or compressed download?"
                      f" it has {os.path.getsize(path):,} bytes)")
    elif filename in expected and not expected[filename][0].match(member):
      problems.append(f"{path} does not hold {expected[filename][1]}: its first entry "
                      f"{member!r} looks like {_describe(member)}")
  if problems:
    raise DataError(f"cannot prepare {name}: " + "; ".join(problems) +
                    f" (tars from {pipeline.IMAGENET_SITE}, after registering)")
  if base == "imagenet2012" and "ILSVRC2012_img_train.tar" not in present:
    log.warning("%s: preparing the validation split only",
                _missing(manual_dir, "ILSVRC2012_img_train.tar"))


def _known_copy(filename: str) -> str | None:
  """Path of a copy of `filename` inside an installed package (pipeline.KNOWN_COPIES)."""
  relative = pipeline.KNOWN_COPIES.get(filename)
  if not relative:
    return None
  package, _, rest = relative.partition("/")
  spec = importlib.util.find_spec(package)   # finds it without importing it
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], rest)
  return path if os.path.isfile(path) else None


def _reachable(url: str, timeout: float = 5.0) -> bool:
  host = urllib.parse.urlparse(url).hostname
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _merged_manual_dir(builder, manual_dir: str, extra: dict[str, str]) -> str:
  """A manual dir of links to manual_dir's files plus `extra` ({file name: path})."""
  merged = os.path.join(builder.data_dir_root, "downloads", "manual-effvit",
                        pipeline.qualified_name(builder).replace("/", "-"))
  shutil.rmtree(merged, ignore_errors=True)
  os.makedirs(merged)
  links = {n: os.path.join(manual_dir, n) for n in (os.listdir(manual_dir)
                                                    if os.path.isdir(manual_dir) else [])}
  links.update(extra)
  for filename, path in links.items():
    os.symlink(os.path.abspath(path), os.path.join(merged, filename))
  return merged


def _download_plan(builder, manual_dir: str) -> str:
  """The manual dir TFDS should read; DataError when a download is needed and impossible."""
  extra, absent = {}, []
  for url, filename, size in pipeline.downloads(builder):
    if os.path.isfile(os.path.join(manual_dir, filename)):
      continue
    copy = _known_copy(filename)
    if copy:
      log.info("using %s as %s (the same file as %s)", copy, filename, url)
      extra[filename] = copy
    else:
      absent.append((url, filename, size))
  for url, filename, size in absent:
    if not _reachable(url):
      target = os.path.join(manual_dir, filename)
      raise DataError(
          f"cannot prepare {pipeline.qualified_name(builder)}: this machine cannot reach "
          f"{urllib.parse.urlparse(url).hostname} (no internet access), so it cannot download "
          f"{url} ({size}); fetch it elsewhere, save it as {target} and run this command again "
          f"(or copy a prepared {builder.data_dir_root}/{builder.name} from another machine)")
  return _merged_manual_dir(builder, manual_dir, extra) if extra else manual_dir


def write_val_tar(images: list[tuple[str, str]], path: str) -> dict[str, str]:
  """Write a stand-in ILSVRC2012_img_val.tar that TFDS labels as `images` ([(wnid, JPEG)]).

  TFDS gives the i-th file of the val tar, in sorted name order, the i-th label of its bundled
  validation_labels.txt (the real val set's labels). Each image is stored as
  ILSVRC2012_val_<i>.JPEG at an index i whose label is its wnid (successive indices for
  several images of a class), and every other name up to the last index used is a directory
  entry: it takes its place in the sorted order but yields no example. The result: TFDS labels
  every image with its own class, and imagenet2012_real gives it the ReaL labels of the real
  val image i (another photo of the same class). Returns {file name in the tar: image}.
  """
  labels = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
  free = collections.defaultdict(list)
  for i, wnid in enumerate(labels):
    free[wnid].append(i)
  for wnid in free:
    free[wnid].reverse()
  placed = {}
  for wnid, image in images:
    if not free.get(wnid):
      raise DataError(f"{image}: {wnid!r} is not an ImageNet class with a free validation index "
                      "(50 images per class at most)")
    placed[free[wnid].pop()] = (wnid, image)
  names = {}
  with tarfile.open(path, "w", dereference=True) as tar:   # symlinked images: their content
    for i in range(max(placed) + 1 if placed else 0):
      name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
      if i in placed:
        tar.add(placed[i][1], arcname=name)
        names[name] = placed[i][1]
      else:
        tar.addfile(_dir_entry(name))
  return names


def _dir_entry(name: str) -> tarfile.TarInfo:
  info = tarfile.TarInfo(name)
  info.type = tarfile.DIRTYPE
  return info


def images_by_wnid(directory: str) -> list[tuple[str, str]]:
  """[(wnid, path)] of the <wnid>_*.JPEG files in `directory`, sorted."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "*"))):
    match = re.match(r"(n\d{8})_.*\.jpe?g$", os.path.basename(path), re.IGNORECASE)
    if match:
      out.append((match.group(1), path))
  if not out:
    raise DataError(f"--val_images={directory} holds no <wnid>_*.JPEG files")
  return out


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None,
            regenerate: bool = False, val_images: str | None = None) -> tfds.core.DatasetBuilder:
  try:
    builder = load_builder(name, data_dir)
    if not regenerate:
      return builder
  except DataError as e:
    if "not prepared" not in str(e):
      raise
  builder = tfds.builder(name, data_dir=data_dir)
  manual_dir = os.path.abspath(manual_dir or os.path.join(builder.data_dir_root, "downloads",
                                                          "manual"))
  if val_images:
    if builder.name not in ("imagenet2012", "imagenet2012_real"):
      raise DataError(f"--val_images prepares imagenet2012 or imagenet2012_real, not {name}")
    if data_dir is None:
      raise DataError("--val_images needs an explicit --data_dir (a stand-in must not take the "
                      "place of the real dataset in the default data dir)")
    stand_in = os.path.join(builder.data_dir_root, "downloads", "val-images")
    os.makedirs(stand_in, exist_ok=True)
    names = write_val_tar(images_by_wnid(val_images),
                          os.path.join(stand_in, "ILSVRC2012_img_val.tar"))
    log.info("wrote a stand-in val tar of %d images from %s", len(names), val_images)
    for filename in ("real.json",):  # ReaL's labels, from the manual dir when it has them
      if os.path.isfile(os.path.join(manual_dir, filename)):
        shutil.copy(os.path.join(manual_dir, filename), stand_in)
    manual_dir = stand_in
  check_manual_files(pipeline.qualified_name(builder), manual_dir)
  tfds_manual = _download_plan(builder, manual_dir)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if regenerate
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=tfds_manual, download_mode=mode))
  except AssertionError as e:  # TFDS' way of saying that manual files are missing
    raise DataError(f"cannot prepare {name}: {' '.join(str(e).split())}") from None
  return tfds.builder(name, data_dir=data_dir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m effvit.data.prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--manual_dir", default=None)
  parser.add_argument("--regenerate", action="store_true")
  parser.add_argument("--val_images", default=None,
                      help="folder of <wnid>_*.JPEG: a small imagenet2012 validation split")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    builder = prepare(args.name, args.data_dir, args.manual_dir, args.regenerate,
                      args.val_images)
  except EffvitError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  splits = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
  print(f"{pipeline.qualified_name(builder)} prepared in {builder.data_dir} ({splits})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
