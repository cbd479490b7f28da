"""Metric writers: TensorBoard events and a metrics.jsonl in the workdir (process 0 only)."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON object per write_scalars call: {"step": ..., "train/loss": ..., ...}."""

  def __init__(self, path: str, resume_step: int = 0):
    if os.path.exists(path):   # a resumed run re-logs the steps after its checkpoint
      with open(path, encoding="utf-8") as f:
        kept = [line for line in f if _step(line) is not None and _step(line) <= resume_step]
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step, scalars):
    record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def _step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):   # e.g. a line cut short by a killed process
    return None


def create_writer(workdir: str, resume_step: int = 0) -> metric_writers.MetricWriter:
  """TensorBoard events + metrics.jsonl; records after `resume_step` are dropped from the
  jsonl (they belong to the part of an interrupted run that is about to be redone)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=True),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step)])
