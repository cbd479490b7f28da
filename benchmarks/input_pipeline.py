"""Decode + augment throughput of effvit's training input pipeline, per core, against what the
train step consumes.

    python benchmarks/input_pipeline.py                        # real JPEGs, 1 core and all
    python benchmarks/input_pipeline.py --source mock --cores 1
    python benchmarks/input_pipeline.py --models pvt_v2_b2 --batch 32

The pipeline is effvit.data.pipeline.train_iterator with the default ImageNet recipe at
`--res` (Inception crop, bicubic antialiased resize, flip, RandAugment 2 ops / magnitude 9,
normalise; `--no-randaug` drops RandAugment), reading
  real  the validation split of imagenet2012 prepared from the JPEGs in `--images` (by default
        ../shared/data/imagenet-sample: 1000 photos, short side 160 px), the way
        `python -m effvit.data.prepare imagenet2012 --val_images=...` does; real ImageNet
        train JPEGs average ~400x350 px, so their decode costs roughly 4-5x more per image
  mock  tfds.testing.mock_data's noise JPEGs of random sizes for imagenet2012 "train".

Each core count runs in a fresh process whose affinity mask holds that many cores (TensorFlow
and tf.data size their thread pools from it). The first `--warmup` batches (buffer fill, graph
tracing) are not timed. The train step is effvit's jitted step (effvit/benchmark_utils.py),
measured in its own process on all cores; the report says how many cores of input work every
second of training needs: consumption / per-core pipeline throughput.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "data" / "imagenet-sample"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--source", default="real", choices=("real", "mock"))
  p.add_argument("--images", default=str(DEFAULT_IMAGES), help="JPEGs named <wnid>_*.JPEG")
  p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(),
                                                    "effvit-bench-imagenet-sample"),
                 help="where the real source is prepared (reused when already there)")
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--batch", type=int, default=32, help="pipeline batch size")
  p.add_argument("--batches", type=int, default=30, help="timed batches")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--cores", default="", help="comma-separated core counts (default: 1 and all)")
  p.add_argument("--no-randaug", action="store_true")
  p.add_argument("--models", default="pvt_v2_b2",
                 help="effvit models whose train step consumption is measured ('' skips)")
  p.add_argument("--train-batch", type=int, default=32)
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def input_config(args, data_dir: str):
  from effvit.data import pipeline
  cfg = pipeline.default_input_config()
  cfg.image_size = args.res
  cfg.data_dir = data_dir
  cfg.shuffle_buffer = 1000
  if args.source == "real":
    cfg.split = "validation"
  if args.no_randaug:
    cfg.randaug_magnitude = 0.0
  return cfg


def prepare_real(args) -> str:
  from effvit.data.prepare import prepare
  prepare("imagenet2012", args.data_dir, val_images=args.images)
  return args.data_dir


def mock_imagenet(data_dir: str, n: int):
  """mock_data for imagenet2012 "train" with metadata saying it holds n examples (as
  tests/test_data.py does: mock_data serves noise JPEGs for whatever the metadata lists)."""
  import tensorflow_datasets as tfds
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name,
                                           filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name="train", shard_lengths=[n], num_bytes=0,
      filename_template=template.replace(split="train"))]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=data_dir)


def pipeline_worker(args) -> dict:
  """Runs in a child process restricted to the wanted cores; returns images/s."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import contextlib
  from effvit.data import pipeline
  if args.source == "mock":
    data_dir = tempfile.mkdtemp(prefix="effvit-mock-")
    ctx = mock_imagenet(data_dir, 2000)
  else:
    data_dir, ctx = args.data_dir, contextlib.nullcontext()
  with ctx:
    batches = pipeline.train_iterator(input_config(args, data_dir), local_batch_size=args.batch,
                                      seed=0)
    for _ in range(args.warmup):
      next(batches)
    t = time.perf_counter()
    for _ in range(args.batches):
      b = next(batches)
    dt = time.perf_counter() - t
  assert b["image"].shape == (args.batch, args.res, args.res, 3)
  return {"images_per_s": args.batches * args.batch / dt,
          "cores": len(os.sched_getaffinity(0))}


def train_worker(args) -> dict:
  from effvit.profile import tune_cpu_allocator
  tune_cpu_allocator()   # as train.py does on CPU: a page-faulting step would understate demand
  import jax
  from effvit.benchmark_utils import EffvitRunner, timed
  out = {}
  for name in filter(None, args.models.split(",")):
    runner = EffvitRunner.from_name(name, {}, args.train_batch, args.res)
    runner.train()
    runner.train()
    sec = sorted(timed(runner.train, 2) for _ in range(3))[1]
    out[name] = args.train_batch / sec
  del jax
  return out


def run_child(argv: list, worker: str, cores: list | None = None) -> dict:
  cmd = [sys.executable, __file__, *argv, "--worker", worker]
  preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
  res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec, check=False)
  if res.returncode:
    sys.stderr.write(res.stderr[-3000:])
    raise SystemExit(f"{worker} worker failed")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.worker:
    result = pipeline_worker(args) if args.worker == "pipeline" else train_worker(args)
    print(json.dumps(result))
    return result
  all_cores = sorted(os.sched_getaffinity(0))
  counts = [int(c) for c in args.cores.split(",")] if args.cores else sorted({1, len(all_cores)})
  if args.source == "real":
    if not glob.glob(os.path.join(args.images, "*.JPEG")):
      raise SystemExit(f"no JPEGs in {args.images}: pass --images or use --source mock")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    prepare_real(args)
  recipe = (f"{args.res}px, Inception crop + bicubic resize + flip"
            + ("" if args.no_randaug else " + RandAugment(2, 9)") + " + normalise")
  print(f"source: {args.source} ({args.images if args.source == 'real' else 'mock_data'}); "
        f"{recipe}; batch {args.batch}; {args.batches} timed batches", flush=True)
  per_core = None
  rows = []
  for n in counts:
    r = run_child(argv, "pipeline", all_cores[:n])
    rows.append((n, r["images_per_s"]))
    if n == 1:
      per_core = r["images_per_s"]
    print(f"input pipeline on {n} core(s): {r['images_per_s']:.1f} images/s "
          f"({r['images_per_s'] / n:.1f} per core)", flush=True)
  per_core = per_core or rows[0][1] / rows[0][0]
  consumption = run_child(argv, "train") if args.models else {}
  print()
  print("| input pipeline | cores | images/s | images/s per core |")
  print("|---|---|---|---|")
  for n, ips in rows:
    print(f"| {args.source} | {n} | {ips:.1f} | {ips / n:.1f} |")
  if consumption:
    print()
    print(f"| train step (batch {args.train_batch}, {len(all_cores)} cores) | images/s "
          f"| pipeline cores needed to keep up |")
    print("|---|---|---|")
    for name, ips in consumption.items():
      print(f"| {name} | {ips:.1f} | {ips / per_core:.2f} |")
  return rows, consumption


if __name__ == "__main__":
  main()
