"""What `model.remat` buys and costs: a train step's memory plan and time, with and without.

    python benchmarks/remat.py                                   # pvt_v2_b2, batch 8, 224/448
    python benchmarks/remat.py --model pvt_v2_b0 --res 224,448,672 --batch 32 --reps 3

For each resolution, effvit's train step (effvit.benchmark_utils.EffvitRunner: forward,
backward, AdamW, donated state, effvit's compiler options) is compiled for the model as
configured and with remat=True (every block recomputed in the backward). Prints XLA's memory
plan of each (temporaries + arguments + outputs, donated buffers once; on GPU/TPU also the
allocator's peak so far) and the median step time over --reps interleaved repetitions, with
remat's ratios to the plain step measured in the same run. --no-time prints the plans only
(compile, no steps: quick at any resolution).
"""
from __future__ import annotations

import argparse

from effvit.benchmark_utils import EffvitRunner, device_peak_bytes, interleave

MIB = 2**20


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="pvt_v2_b2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--res", default="224,448", help="comma-separated resolutions")
  p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
  p.add_argument("--no-time", action="store_true", help="memory plans only")
  args = p.parse_args(argv)
  from effvit.profile import tune_cpu_allocator
  tune_cpu_allocator()   # as train.py does on the CPU backend

  print(f"{args.model}, batch {args.batch}: train step, plain -> remat")
  for res in (int(r) for r in args.res.split(",")):
    runners = {name: EffvitRunner.from_name(args.model, {"remat": remat}, args.batch, res)
               for name, remat in (("plain", False), ("remat", True))}
    plan = {k: r.memory["train"].get("peak", float("nan")) / MIB for k, r in runners.items()}
    line = (f"{res:>5} px  plan {plan['plain']:8.0f} -> {plan['remat']:8.0f} MiB "
            f"({plan['remat'] / plan['plain']:.2f}x)")
    if not args.no_time:
      sec = interleave({k: r.train for k, r in runners.items()}, steps=1, reps=args.reps,
                       warmup=1)
      line += (f"  step {1e3 * sec['plain']:8.0f} -> {1e3 * sec['remat']:8.0f} ms "
               f"({sec['remat'] / sec['plain']:.2f}x)")
    device_peak = device_peak_bytes()
    if device_peak is not None:
      line += f"  device peak so far {device_peak / MIB:.0f} MiB"
    print(line, flush=True)
    del runners


if __name__ == "__main__":
  main()
