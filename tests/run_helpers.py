"""Helpers shared by the training, reliability and data tests: comparing train states, and
imagenet2012 metadata for tfds.testing.mock_data."""
import os

import jax
import numpy as np
import tensorflow_datasets as tfds


def write_imagenet_metadata(data_dir: str, examples: int = 16) -> str:
  """imagenet2012's dataset_info in data_dir with `examples` train and validation examples, so
  that under mock_data(policy=USE_FILES) the dataset looks prepared (noise JPEGs)."""
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name,
                                           filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[examples], num_bytes=0,
                          filename_template=template.replace(split=s))
      for s in ("train", "validation")]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return data_dir


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    assert np.array_equal(x, y), jax.tree_util.keystr(path)


def assert_trees_close(a, b, **tolerances):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b),
                          strict=True):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tolerances)
