"""SIGKILL a training run at random points, re-run it each time: it must end bit-identical.

  python tools/kill_resume.py [--kills=5] [--steps=150] [--checkpoint_every=10] [--seed=S]
      [--config=configs/quickstart.py] [--workdir=DIR] [--config.FIELD=VALUE ...]

Two train.py runs of the same command side by side: one uninterrupted, one killed with SIGKILL
`--kills` times, each time at a random point after a random step (mid-step or mid-save, no
warning), and re-launched with the same command until it finishes. PASS when the final
checkpoints' train states (params, optimizer state, step, ...) are bit-identical and every
logged loss is equal. `--steps` shortens the run (--config.total_steps); --config.* flags go
to train.py as they are. Both runs log every step and checkpoint every `--checkpoint_every`
steps. Prints the kill steps, the step each re-launch resumed from, PASS or FAIL and the wall
time; exits 0 on PASS, 1 on FAIL. The test-sized version: tests/test_reliability.py.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:   # a line being written
      pass
  return out


def saved_state(workdir: pathlib.Path, step: int):
  """The train state of a checkpoint as numpy arrays."""
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)   # orbax: "Metadata file does not exist"
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  path = str(workdir / "checkpoints" / str(step) / "state")
  with ocp.PyTreeCheckpointer() as c:
    meta = c.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def differences(a, b) -> list[str]:
  import jax
  import numpy as np
  flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  if flat_a.keys() != flat_b.keys():
    return ["the two states have different leaves"]
  return [jax.tree_util.keystr(k) for k in flat_a if not np.array_equal(flat_a[k], flat_b[k])]


class Run:
  """train.py with a fixed command line, logging to <workdir>.log (appended per launch)."""

  def __init__(self, command: list[str], workdir: pathlib.Path):
    self.command, self.workdir = command, workdir
    self.log = workdir.parent / f"{workdir.name}.log"
    self.proc = None
    self.launches = 0

  def launch(self) -> None:
    with open(self.log, "a") as log:
      log.write(f"\n=== launch {self.launches + 1}\n")
      log.flush()
      self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    self.launches += 1

  def last_step(self) -> int:
    r = records(self.workdir)
    return r[-1]["step"] if r else 0

  def launch_log(self, k: int) -> str:
    return self.log.read_text().split("\n=== launch ")[k].split("\n", 1)[-1]

  def total_steps(self) -> int | None:
    m = re.search(r"steps \d+ -> (\d+)", self.log.read_text())
    return int(m.group(1)) if m else None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--steps", type=int, default=0, help="--config.total_steps (0: config's)")
  parser.add_argument("--checkpoint_every", type=int, default=10)
  parser.add_argument("--seed", type=int, default=None, help="of the kill points")
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds for everything")
  args, train_flags = parser.parse_known_args(argv)
  seed = args.seed if args.seed is not None else random.randrange(2**31)
  rng = random.Random(seed)
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume-")).resolve()
  root.mkdir(parents=True, exist_ok=True)
  flags = [f"--config={args.config}", "--config.log_every_steps=1",
           f"--config.checkpoint_every_steps={args.checkpoint_every}", *train_flags]
  if args.steps:
    flags.append(f"--config.total_steps={args.steps}")
  runs = {name: Run([sys.executable, "train.py", *flags, f"--workdir={root / name}"],
                    root / name) for name in ("straight", "killed")}
  for run in runs.values():
    if run.workdir.exists():
      sys.exit(f"error: {run.workdir} exists: use another --workdir")

  t0 = time.time()
  deadline = t0 + args.timeout
  straight, killed = runs["straight"], runs["killed"]
  straight.launch()
  killed.launch()
  print(f"workdir {root}; kill points drawn with seed {seed}", flush=True)
  while (total := killed.total_steps()) is None:
    if killed.proc.poll() is not None:
      print(killed.log.read_text()[-3000:])
      sys.exit("error: train.py failed before training")
    time.sleep(0.1)
  points = sorted(rng.sample(range(1, total), min(args.kills, total - 1)))
  kills = []
  for target in points:
    # After the step the last kill came after: older records are the killed launch's.
    target = max(target, kills[-1] + 1 if kills else 0)
    if target >= total:
      break
    while killed.last_step() < target and killed.proc.poll() is None:
      if time.time() > deadline:
        sys.exit("error: timed out")
      time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))   # a random point inside the step (or the save) after it
    if killed.proc.poll() is not None:
      print(f"run finished before kill point {target}", flush=True)
      break
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.proc.wait()
    kills.append(killed.last_step())
    print(f"SIGKILL after step {kills[-1]} (kill point {target}, "
          f"{time.time() - t0:.0f} s)", flush=True)
    killed.launch()
  for run in runs.values():
    code = run.proc.wait(max(deadline - time.time(), 1))
    if code != 0:
      print(run.log.read_text()[-3000:])
      sys.exit(f"error: the {run.workdir.name} run exited with status {code}")
  wall = time.time() - t0

  resumed = []
  for k in range(2, killed.launches + 1):
    m = re.search(r"resumed from checkpoint at step (\d+)", killed.launch_log(k))
    resumed.append(int(m.group(1)) if m else 0)
  problems = differences(saved_state(killed.workdir, total), saved_state(straight.workdir, total))
  problems = [f"final state differs at {p}" for p in problems[:5]]
  loss = {name: [(r["step"], r.get("train/loss")) for r in records(run.workdir)]
          for name, run in runs.items()}
  if loss["killed"] != loss["straight"]:
    problems.append("logged losses differ")
  print(f"steps {total}; SIGKILL after steps {kills}; re-launches resumed from steps {resumed}")
  print(f"{'PASS' if not problems else 'FAIL: ' + '; '.join(problems)} "
        f"(final train state {'bit-identical' if not problems else 'checked'}, "
        f"{len(loss['killed'])} losses compared); wall time {wall:.0f} s")
  return 0 if not problems else 1


if __name__ == "__main__":
  sys.exit(main())
