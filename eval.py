"""Evaluate a run's checkpoint, or converted PyTorch weights, on every entry of config.evals.

  python eval.py --config=configs/pvt_v2.py:b2 --workdir=runs/b2            # newest checkpoint
  python eval.py --config=configs/pvt_v2.py:b2 --checkpoint=runs/b2/checkpoints/300000
  python eval.py --config=configs/pvt_v2.py:b0 --config.model_init=pvt_v2_b0.safetensors \\
      --workdir=/tmp/b0-eval

Prints dataset, split, examples, top-1, top-5, loss and images/s per entry and writes them to
<workdir>/eval_results.json. See effvit/evaluate.py for the datasets and their labels.
"""
from absl import flags

from effvit import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A checkpoint step directory (<run>/checkpoints/<step>) or a run's "
    "workdir (its newest checkpoint). Default: the newest checkpoint in --workdir.")


def main(config, workdir):
  from effvit.evaluate import evaluate
  evaluate(config, workdir, checkpoint=_CHECKPOINT.value)


if __name__ == "__main__":
  cli.run(main)
