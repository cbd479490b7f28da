"""Quickstart: a small PVTv2 on scikit-learn's digits, offline on a 2-core CPU in under 3 minutes.

  python train.py --config=configs/quickstart.py --workdir=/tmp/effvit-quickstart

The dataset (`sklearn_digits`, 1500 train / 297 test images upsampled to 32×32 RGB) is
prepared automatically from the copy inside scikit-learn. The model is pvt_v2_b0's recipe
(overlapping patch embeddings, SRA, ConvFFN) made small: one block per stage, strides
2, 2, 2, 2 so a 32-px image gives 16, 8, 4 and 2 px maps, and reduction ratios 4, 2, 1, 1.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.COMMON_ARGS)
  c = common.base_config(
      "pvt_v2_b0", num_classes=10, embed_dims=(32, 64, 128, 128), depths=(1, 1, 1, 1),
      num_heads=(1, 2, 4, 4), mlp_ratios=(4, 4, 4, 4), sr_ratios=(4, 2, 1, 1),
      patch_strides=(2, 2, 2, 2), drop_path_rate=0.0)
  c.input.update(dataset="sklearn_digits", image_size=32, batch_size=64, flip=False,
                 inception_crop=True, crop_scale=(0.6, 1.0), randaug_magnitude=0.0,
                 shuffle_buffer=2000)
  c.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.0, label_smoothing=0.1)
  c.optimizer.update(base_lr=2e-3, lr_batch_base=64, weight_decay=0.05)
  c.schedule.update(warmup_epochs=2.0, warmup_lr=1e-5, min_lr=1e-5)
  c.total_epochs = 25.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 0            # evaluate once, at the end
  c.evals = common.ml_collections.ConfigDict()
  c.evals.test = common.imagenet_eval("sklearn_digits", "test", image_size=32, crop_pct=1.0,
                                      interpolation="bilinear", batch_size=64)
  return common.apply_common_args(c, arg)
