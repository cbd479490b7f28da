"""Train a model from a config; re-running the same command resumes.

  python train.py --config=configs/quickstart.py --workdir=/tmp/effvit-quickstart
  python train.py --config=configs/pvt_v2.py:b2 --workdir=runs/b2 --config.model.sr_ratios=4,2,1,1
"""
from effvit import cli


def main(config, workdir):
  from effvit.train.loop import train_and_evaluate
  train_and_evaluate(config, workdir)


if __name__ == "__main__":
  cli.run(main)
