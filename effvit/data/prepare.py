"""Prepare a TFDS dataset for effvit.

  python -m effvit.data.prepare NAME [--data_dir=DIR] [--manual_dir=DIR] [--regenerate]

Manually downloaded files are read from --manual_dir (default <data_dir>/downloads/manual/);
for imagenet2012 that is ILSVRC2012_img_train.tar and/or ILSVRC2012_img_val.tar (a split whose
tar is missing is skipped). --regenerate rebuilds a prepared dataset, e.g. to add a split.
"""
from __future__ import annotations

import argparse
import sys

import tensorflow_datasets as tfds

from effvit.data.pipeline import load_builder  # also registers effvit's own builders
from effvit.errors import DataError, EffvitError


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None,
            regenerate: bool = False) -> tfds.core.DatasetBuilder:
  try:
    builder = load_builder(name, data_dir)
    if not regenerate:
      return builder
  except DataError as e:
    if "not prepared" not in str(e):
      raise
  builder = tfds.builder(name, data_dir=data_dir)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if regenerate
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode))
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
  args = parser.parse_args(argv)
  try:
    builder = prepare(args.name, args.data_dir, args.manual_dir, args.regenerate)
  except EffvitError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  splits = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
  print(f"{builder.name} prepared in {builder.data_dir} ({splits})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
