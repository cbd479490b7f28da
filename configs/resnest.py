"""ResNeSt on ImageNet-1k: `--config=configs/resnest.py:resnest50d` (any registered ResNeSt).

ResNeSt's own recipe (Zhang et al. 2020, §5.1 as we recall it): SGD with momentum 0.9,
lr 0.1 × batch/256 with 5 warm-up epochs and cosine decay, weight decay 1e-4 kept off
BatchNorm and biases, label smoothing 0.1, Mixup α = 0.2 (no CutMix), AutoAugment-style
augmentation (RandAugment here), 270 epochs. DropBlock and the paper's dropout before the
classifier are not implemented. Evaluation uses each
model's timm crop and interpolation (refs/architectures.md §5).
"""
from configs import common

# timm pretrained configs: (eval size, crop_pct, interpolation).
EVAL = dict(resnest14d=(224, 0.875, "bilinear"), resnest26d=(224, 0.875, "bilinear"),
            resnest50d=(224, 0.875, "bilinear"), resnest101e=(256, 0.875, "bilinear"),
            resnest200e=(320, 0.909, "bicubic"), resnest269e=(416, 0.928, "bicubic"),
            resnest50d_4s2x40d=(224, 0.875, "bicubic"), resnest50d_1s4x24d=(224, 0.875, "bicubic"))


def get_config(arg=None):
  arg = common.parse_arg(arg, **{**common.COMMON_ARGS, "variant": "resnest50d"})
  common.check_variant(arg, "ResNeSt", list(EVAL))
  size, crop, interp = EVAL[arg.variant]
  c = common.base_config(arg.variant)
  c.input.image_size = size
  c.optimizer.update(name="sgd", base_lr=0.1, lr_batch_base=256, weight_decay=1e-4,
                     momentum=0.9, nesterov=False)
  c.schedule.update(warmup_epochs=5.0, warmup_lr=0.0, min_lr=0.0)
  c.mixup.update(mixup_alpha=0.2, cutmix_alpha=0.0, switch_prob=0.0)
  c.total_epochs = 270.0
  c.evals.val.update(image_size=size, crop_pct=crop, interpolation=interp)
  return common.apply_common_args(c, arg)
