"""Where the time of one effvit step goes: XLA ops timed by jax.profiler, grouped by module.

    python benchmarks/op_profile.py --model pvt_v2_b2 --batch 32 --mode train
    python benchmarks/op_profile.py --model resnest50d --batch 8 --mode inference --top 30

Compiles effvit's inference or train step (effvit/benchmark_utils.EffvitRunner: forward,
backward, AdamW), runs it until warm, traces one call with `jax.profiler.trace` and reads the
trace (an XSpace protobuf, parsed with TensorFlow's copy of its schema). Every executed XLA op
(a fusion, a library call such as YNNPACK's `ynn_fusion`, a copy) is attributed, through the
`op_name` metadata of the compiled HLO, to the Flax module path that produced it, with stage
and block indices dropped, so the 3 + 4 + 6 + 3 blocks of a model add up per layer kind:

    ms  share  pass  module path         primitive
    988  14.9%  bwd   mlp/dwconv          reduce_sum

`bwd` marks ops of the gradient (XLA names them transpose(jvp(...))). Each instant of the
traced step is shared among the ops running then, and convolutions, which run asynchronously
on pool threads the trace does not see, get the instants where no other op runs (see
traced_op_ms), so the shares add up to the wall time.
XLA's filter-gradient convolutions carry no op_name; they are listed as `-  convolution`.
Glibc's allocator is tuned first (effvit.profile.tune_cpu_allocator), as in compare_timm.py.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="pvt_v2_b2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--mode", default="train", choices=("train", "inference"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (parameters stay float32)")
  p.add_argument("--top", type=int, default=25, help="rows of each table")
  return p.parse_args(argv)


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata (the JAX/Flax scope that produced it)."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def traced_op_ms(call, trace_dir: str, async_ops=frozenset()) -> collections.Counter:
  """{op name: ms of wall time} of the XLA ops executed during one `call()`.

  Most XLA:CPU ops run on the thunk executor's thread and split their work over the pool
  themselves: their trace event is their run. Convolutions (Eigen; `async_ops`, named by the
  caller from the HLO) run asynchronously: the trace shows their dispatch `X` and, later,
  `end: X`, while the work in between runs on pool threads that record nothing. So each
  instant is shared among the synchronous ops running then; an instant with none goes to the
  asynchronous ops in flight (dispatched, not yet ended), and with neither to "(idle)". The
  shares add up to the traced wall time. (Synchronous ops get `end:` events too, sometimes
  tens of ms after their event ends, so those are not used as their ends.)
  """
  import jax
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  with jax.profiler.trace(trace_dir):
    call()
  path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  events = []   # (start, end in ps, op, is an `end:` event)
  for plane in space.planes:
    meta = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):   # XLA:CPU's worker threads
        continue
      for e in line.events:
        name = meta.get(e.metadata_id, "?")
        if name.startswith(("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener")):
          continue   # the executor's and the pool's own spans, which enclose the ops
        t0 = 1000 * line.timestamp_ns + e.offset_ps
        events.append((t0, t0 + e.duration_ps, name.removeprefix("end: "),
                       name.startswith("end: ")))
  return wall_shares(op_runs(events, async_ops), async_ops)


def op_runs(events, async_ops=frozenset()) -> dict:
  """{op: [[start, end], ...] per execution} from trace events (start, end, op, is_end): an
  `end: X` event of an asynchronous op X closes X's latest run; other `end:` events are
  dropped."""
  runs = collections.defaultdict(list)
  for t0, t1, name, is_end in sorted(events):
    if not is_end:
      runs[name].append([t0, t1])
    elif name in async_ops and runs[name]:
      runs[name][-1][1] = max(runs[name][-1][1], t1)
  return dict(runs)


def wall_shares(runs: dict, background=frozenset()) -> collections.Counter:
  """{op: ms}: each instant from the first start to the last end is split equally among the
  ops with a run [start, end] (ps) containing it, `background` ops only where no other op
  runs; instants covered by none go to "(idle)"."""
  edges = sorted((t, kind, op) for op, rs in runs.items() for t0, t1 in rs
                 for t, kind in ((t0, 1), (t1, -1)))
  shares, active, last = collections.Counter(), collections.Counter(), None
  for t, kind, op in edges:
    live = [a for a, n in active.items() if n > 0]
    live = [a for a in live if a not in background] or live or ["(idle)"]
    if last is not None and t > last:
      for a in live:
        shares[a] += (t - last) / 1e9 / len(live)
    active[op] += kind
    last = t
  return shares


def convolutions(hlo_text: str) -> frozenset:
  """Names of the HLO's convolution instructions (XLA:CPU runs them asynchronously)."""
  return frozenset(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ convolution\(", hlo_text,
                              re.MULTILINE))


def group_key(op: str, scope: str) -> tuple[str, str, str]:
  """(pass, module path without stage/block indices, primitive) of one op."""
  if not scope:
    return ("-", op.split(".")[0], "")
  parts = scope.split("/")
  pass_ = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
  keep = [p for p in parts if "(" not in p and not re.fullmatch(r"(stages|layer\d)_\d+|blocks_\d+",
                                                              p)]
  keep = [p for p in keep if p not in ("PyramidTransformer", "ResNeSt", "LaViT")]
  return (pass_, "/".join(keep[:-1]) or "(model)", keep[-1] if keep else parts[-1])


def main(argv=None):
  args = parse_args(argv)
  from effvit.profile import tune_cpu_allocator
  tune_cpu_allocator()
  from effvit.benchmark_utils import EffvitRunner
  runner = EffvitRunner.from_name(args.model, {}, args.batch, args.res, args.dtype)
  call = runner.train if args.mode == "train" else runner.infer
  hlo = runner.compiled[args.mode].as_text()
  scopes = op_names(hlo)
  for _ in range(3):
    call()
  t = time.perf_counter()
  call()
  wall = time.perf_counter() - t
  ops = traced_op_ms(call, tempfile.mkdtemp(prefix="effvit-op-profile-"), convolutions(hlo))
  total = sum(ops.values())
  print(f"{args.model} {args.mode} {args.dtype} batch {args.batch} at {args.res}px: "
        f"{1e3 * wall:.0f} ms per step untraced; {len(ops)} XLA ops, {total:.0f} ms traced")
  groups = collections.Counter()
  for op, ms in ops.items():
    groups[group_key(op, scopes.get(op, ""))] += ms
  print(f"\n{'ms':>8} {'share':>6}  pass  module path / primitive")
  for (pass_, path, prim), ms in groups.most_common(args.top):
    print(f"{ms:8.1f} {100 * ms / total:5.1f}%  {pass_:4}  {path}  {prim}")
  print(f"\n{'ms':>8}  largest single ops")
  for op, ms in ops.most_common(args.top):
    print(f"{ms:8.1f}  {op:30}  {scopes.get(op, '')[-90:]}")


if __name__ == "__main__":
  main()
