"""Exact evaluation across hosts: two JAX processes on this machine, 4 CPU devices each.

  python tools/eval_multihost_check.py [--processes=2] [--batch=40]

Each process runs effvit's Evaluator on the digits test split (297 examples, so every host's
part is padded) with a global batch that does not divide it, and prints its result; both must
report all 297 examples and the same metrics as one process on one device.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(process_id: int, num_processes: int, port: int, data_dir: str, batch: int) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id)
  import flax.linen as nn
  import jax.numpy as jnp
  from effvit import data
  from effvit.evaluate import Evaluator
  from effvit.train import sharding

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(10)(x.reshape(len(x), -1))

  model = Linear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  cfg = data.default_eval_config()
  cfg.update(dataset="sklearn_digits", split="test", data_dir=data_dir, image_size=32,
             crop_pct=1.0)
  cfg.batch_size = batch
  devices = jax.devices() if num_processes > 1 else jax.devices()[:1]
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=devices)
  result = Evaluator("test", cfg, model, mesh, num_classes=10).run(variables)
  print("RESULT " + json.dumps({"process": jax.process_index(), "devices": mesh.size,
                                **result}), flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--batch", type=int, default=40)
  parser.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    pid, n, port, data_dir, batch = args.worker
    worker(int(pid), int(n), int(port), data_dir, int(batch))
    return 0
  sys.path.insert(0, ROOT)
  data_dir = tempfile.mkdtemp(prefix="effvit-digits-")
  from effvit.data import load_builder
  load_builder("sklearn_digits", data_dir)   # prepared once, before the processes read it
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  runs = {}
  for n in (1, args.processes):
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(n), str(port),
                               data_dir, str(args.batch)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(n)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
      if p.returncode:
        print(err[-3000:], file=sys.stderr)
        return 1
    runs[n] = [json.loads(line[len("RESULT "):]) for out, _ in outs
               for line in out.splitlines() if line.startswith("RESULT ")]
  single = runs[1][0]
  ok = True
  for r in runs[args.processes]:
    print(json.dumps(r))
    same = all(abs(r[k] - single[k]) < 1e-6 for k in ("test/top1", "test/top5", "test/loss"))
    ok &= r["test/examples"] == 297 and same
  print(f"one process, one device: {json.dumps(single)}")
  print("OK" if ok else "MISMATCH")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
