"""The training loop in-process (issue 4): every family trains from its own config file and a
stopped run resumes bit-identically; model_init loads timm weights (1 vs 8 devices, FSDP and
checkpoints across device counts: test_reliability.py); gradient
accumulation and EMA; LaViT's auxiliary loss; bad input fails before anything is written.

Runs use each family's config file shrunk by overrides (one block per stage, small dims,
32 px) on tfds.testing.mock_data's imagenet2012 (noise JPEGs, 1000 classes). Every Trainer
compiles its own init and step (the slow part on CPU), so each test reuses its trainers:
a resume is a second `run()` of the same Trainer after its newest checkpoint was deleted.
(train.py in a fresh process, SIGTERM and resume: test_train_cli.py.)
"""
import functools
import importlib
import json
import logging
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import traverse_util

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the configs package

from run_helpers import (assert_trees_close, assert_trees_equal, host,  # noqa: E402
                         write_imagenet_metadata)
from effvit import convert  # noqa: E402
from effvit.errors import ConfigError, DataError, EffvitError  # noqa: E402
from effvit.train import checkpoint, loop  # noqa: E402

TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
            mlp_ratios=(2, 2, 2, 2))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """A data_dir with imagenet2012 metadata (16 train / 16 validation) for mock_data."""
  return write_imagenet_metadata(str(tmp_path_factory.mktemp("tfds")))


def mocked(data_dir):
  # Entered per use: inside it every data_dir looks prepared, which the error tests must avoid.
  return tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=data_dir)


def make_config(family, variant, data_dir, steps=2, batch=8, evals=False, **model):
  """configs/<family>.py:<variant> at 32 px on the mock data, shrunk through overrides."""
  c = importlib.import_module(f"configs.{family}").get_config(variant)
  c.model.update(model)
  c.input.update(data_dir=data_dir, image_size=32, batch_size=batch, shuffle_buffer=16)
  if evals:
    for e in c.evals.values():
      e.update(data_dir=data_dir, image_size=32, batch_size=16)
  else:
    c.evals = ml_collections.ConfigDict()
  c.update(total_steps=steps, log_every_steps=1, checkpoint_every_steps=1, eval_every_steps=0)
  return c


def trainer_for(config, workdir, devices=None):
  return loop.Trainer(loop.validate(config, str(workdir), devices))


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def untimed(record):
  return {k: v for k, v in record.items() if "per_sec" not in k and "seconds" not in k}


def losses(workdir):
  return np.array([r["train/loss"] for r in records(workdir) if "train/loss" in r])


def rerun_from(trainer, step):
  """Delete the checkpoints after `step` and run again: what re-running a killed job does."""
  ckpts = pathlib.Path(trainer.plan.workdir, "checkpoints")
  for d in ckpts.iterdir():
    if d.name.isdigit() and int(d.name) > step:
      shutil.rmtree(d)
  return trainer.run()


# ----------------------------------------------------------------------------- every family

FAMILIES = {
    "pvt_v1": ("pvt_v1", "tiny", TINY),
    "twins_pcpvt": ("twins", "pcpvt_small", TINY),
    "twins_svt": ("twins", "svt_small", dict(TINY, depths=(2, 1, 1, 1))),   # LSA, then GSA
    "resnest": ("resnest", "resnest14d", dict(depths=(1, 1, 1, 1), planes=(8, 16, 16, 32),
                                              stem_width=8)),
    # One VA then one LA layer in stage 3, over a 2x2 token grid with 2x2 keys (the
    # diagonality loss needs more than one key); Θ/Ψ are sized for img_size, the train size.
    "lavit": ("lavit", "tiny", dict(TINY, depths=(1, 1, 2, 1), va_layers=(1, 1, 1, 1),
                                    sr_ratios=(8, 4, 1, 1), img_size=32)),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_and_resumes_bit_identically(name, imagenet, tmp_path, caplog):
  """Two steps on one device (pvt_v2 runs in the device test); then the run is stopped after
  step 1 (its step-2 checkpoint deleted) and re-run: the state is bit-identical."""
  family, variant, model = FAMILIES[name]
  c = make_config(family, variant, imagenet, **model)
  c.aux_loss_weights.dp_loss = 0.5
  # Mixup's Beta sampling doubles the step's compile time; the device test below covers it.
  c.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0)
  caplog.set_level(logging.INFO, logger="effvit")
  with mocked(imagenet):
    trainer = trainer_for(c, tmp_path / "run", jax.devices()[:1])
    first = trainer.run()
    straight, logged = host(trainer.state), records(tmp_path / "run")
    second = rerun_from(trainer, 1)
  assert int(straight.step) == 2 and np.isfinite(first["train/loss"])
  assert first["train/grad_norm"] > 0 and straight.nonfinite_count == 0
  assert "resumed from checkpoint at step 1" in caplog.text
  assert_trees_equal(host(trainer.state), straight)
  assert untimed(second) == untimed(first)
  assert [r["step"] for r in logged] == [1, 2]
  assert list(map(untimed, records(tmp_path / "run"))) == list(map(untimed, logged))
  if name == "resnest":
    assert straight.batch_stats   # BatchNorm statistics are part of the state and resume
  if name == "lavit":   # the diagonality loss of the LA layer, weighted by its config entry
    dp = first["train/aux/dp_loss"]
    assert dp > 1e-4
    assert first["train/loss"] == pytest.approx(first["train/ce_loss"] + 0.5 * dp, rel=1e-6)
  else:
    assert first["train/loss"] == first["train/ce_loss"]


# ------------------------------------------------------- devices, FSDP, model_init, metrics

@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
  """A reduced pvt_v2_b0 from timm with a 7-class head, as .safetensors and (with torch) .pth."""
  from safetensors.numpy import save_file
  try:
    from effvit.reference import import_timm
    model = import_timm().create_model("pvt_v2_b0", num_classes=7, **TINY)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
  except ModuleNotFoundError:   # no `reference` extra: the same timm key names, our export
    from effvit.models import create_model
    model = create_model("pvt_v2_b0", num_classes=7, **TINY)
    variables = jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))
    sd = convert.to_torch_state_dict("pvt_v2_b0", variables)
  path = tmp_path_factory.mktemp("weights")
  save_file(sd, str(path / "tiny.safetensors"))
  files = {"state_dict": sd, "safetensors": str(path / "tiny.safetensors"),
           "pth": str(path / "tiny.safetensors")}
  try:
    import torch
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path / "tiny.pth")
    files["pth"] = str(path / "tiny.pth")
  except ModuleNotFoundError:
    pass
  return files


def test_model_init_ema_mixup_and_metrics_on_8_devices(imagenet, timm_weights, tmp_path,
                                                       monkeypatch):
  """The pvt_v2 config (mixup, cutmix, drop path) started from timm weights (a 7-class head,
  re-initialised for 1000), EMA on, 6 steps on 8 devices data parallel with evaluations;
  stopped after step 3 and re-run, it ends bit-identical. (1 vs 8 devices and FSDP over 20
  steps, and checkpoints moving between 8, 4 and 1 devices: test_reliability.py.)"""
  c = make_config("pvt_v2", "b0", imagenet, steps=6, batch=16, evals=True, **TINY)
  c.update(model_init=timm_weights["safetensors"], checkpoint_every_steps=3)
  c.optimizer.ema_decay = 0.9
  # mock_data swaps in a fake filesystem while it opens a dataset (the final evaluation): an
  # asynchronous save still running then would write into it. Real data needs no such care.
  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", functools.partialmethod(
      checkpoint.Checkpointer.__init__, asynchronous=False))
  with mocked(imagenet):
    dp = trainer_for(c, tmp_path / "dp")
    result = dp.run()
    dp_losses, straight = losses(tmp_path / "dp"), host(dp.state)
    rerun_from(dp, 3)
    again = dp.run()   # a finished run only evaluates its final state again

  assert dp.plan.mesh.size == 8 and len(dp_losses) == 6 and np.isfinite(dp_losses).all()
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(dp.state.params))
  assert_trees_equal(host(dp.state), straight)
  np.testing.assert_array_equal(losses(tmp_path / "dp"), dp_losses)

  # model_init: all but the head come from the file (the lr is ~1e-5: 6 steps move < 1e-3);
  # the 7-class head was re-initialised for the dataset's 1000 classes. The .pth file holds
  # the same tensors (torch.save of {"model": state_dict}).
  expected = traverse_util.flatten_dict(convert.from_torch_state_dict(
      "pvt_v2_b0", timm_weights["state_dict"], num_classes=7, **TINY)["params"])
  final = traverse_util.flatten_dict(straight.params)
  assert set(final) == set(expected)
  for path, value in final.items():
    if path[0] == "head":
      assert value.shape[-1] == 1000 and expected[path].shape[-1] == 7
    else:
      np.testing.assert_allclose(value, expected[path], atol=1e-3, err_msg=str(path))
  pth = convert.load_state_dict_file(timm_weights["pth"])
  assert set(pth) == set(timm_weights["state_dict"])
  for k, v in timm_weights["state_dict"].items():
    np.testing.assert_array_equal(np.asarray(pth[k]), v)

  # The run's last record: train metrics and both evaluations (params and EMA params).
  for key in ("train/loss", "train/lr", "train/images_per_sec", "val/top1", "val_ema/top1"):
    assert key in result, key
  assert result["val/examples"] == 16
  log = records(tmp_path / "dp")
  assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]   # one record per log step
  assert all({"step", "train/loss", "train/lr"} <= set(r) for r in log)
  assert untimed(result) == untimed({k: v for k, v in log[-1].items() if k != "step"})
  assert untimed(again) == {k: v for k, v in untimed(result).items() if "train/" not in k}
  assert records(tmp_path / "dp") == log
  assert json.load(open(tmp_path / "dp" / "config.json"))["model_init"].endswith(".safetensors")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "dp"))


# ------------------------------------------------------------------ accumulation and EMA

def test_gradient_accumulation_and_ema_equal_one_big_batch(imagenet, tmp_path):
  """4 micro-steps of 8 with accum_steps=2 make the same 2 updates (and EMA) as 2 steps of 16
  (SGD, no mixup or drop path, so the two differ only in how the batch is split)."""
  def config(batch, accum):
    # One stage is enough here, and compiles in a quarter of the time.
    c = make_config("pvt_v2", "b0", imagenet, steps=2 * accum, batch=batch,
                    embed_dims=(16,), depths=(1,), num_heads=(1,), mlp_ratios=(2,),
                    sr_ratios=(2,), mixers=("sra",), windows=(7,), pool_sizes=(7,),
                    patch_strides=(4,), va_layers=(1,), drop_path_rate=0.0)
    c.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0)
    c.optimizer.update(name="sgd", base_lr=0.5, lr_batch_base=16, accum_steps=accum,
                       ema_decay=0.5)
    c.schedule.warmup_epochs = 0.0
    return c

  devices = jax.devices()[:1]
  with mocked(imagenet):
    big = trainer_for(config(16, 1), tmp_path / "big", devices)
    big_result = big.run()
    acc = trainer_for(config(8, 2), tmp_path / "acc", devices)
    acc_result = acc.run()
  assert int(acc.state.step) == 4 and int(big.state.step) == 2
  assert acc_result["train/lr"] == big_result["train/lr"] > 0
  params, ema = host(acc.state.params), host(acc.state.ema_params)
  assert_trees_close(params, host(big.state.params), atol=2e-6)
  assert_trees_close(ema, host(big.state.ema_params), atol=2e-6)
  lag = max(np.abs(e - p).max() for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))
  assert lag > 1e-3   # the EMA trails the params


# ------------------------------------------------------------------------------ overrides

def test_reduction_ratio_overrides_change_the_built_model(imagenet, tmp_path):
  shapes = {}
  for sr in ((8, 4, 2, 1), (4, 2, 1, 1)):
    c = make_config("pvt_v2", "b0", imagenet, **TINY)
    c.model.sr_ratios = sr
    with mocked(imagenet):
      plan = loop.validate(c, str(tmp_path / "run"), jax.devices()[:1])
    params = jax.eval_shape(plan.model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(plan.image_shape, jnp.float32))["params"]
    shapes[sr] = {k[0]: v.shape for k, v in traverse_util.flatten_dict(params).items()
                  if "sr" in k and k[-1] == "kernel"}
  assert shapes[(8, 4, 2, 1)] == {"stages_0": (8, 8, 16, 16), "stages_1": (4, 4, 32, 32),
                                  "stages_2": (2, 2, 32, 32)}
  assert shapes[(4, 2, 1, 1)] == {"stages_0": (4, 4, 16, 16), "stages_1": (2, 2, 32, 32)}
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- bad input

def one_line_error(config, workdir, devices=None, kind=EffvitError):
  with pytest.raises(kind) as e:
    loop.train_and_evaluate(config, str(workdir), devices)
  message = str(e.value)
  assert message and "\n" not in message
  return message


def pvt_v2(data_dir, **changes):
  c = make_config("pvt_v2", "b0", data_dir, evals=True, **TINY)
  for path, value in changes.items():
    *parents, leaf = path.split("__")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# case -> (config maker, what the one-line message must say)
BAD = {
    "batch not divisible": (lambda d: pvt_v2(d, input__batch_size=12),
                            "input.batch_size=12 is not divisible by the 8 devices; use a "
                            "multiple of 8 (e.g. 8, 16, 32"),
    "eval batch not divisible": (lambda d: pvt_v2(d, evals__val__batch_size=20),
                                 "evals.val.batch_size=20 is not divisible"),
    "classes differ": (lambda d: pvt_v2(d, model__num_classes=10),
                       "imagenet2012 has 1000 classes but model.num_classes=10; set "
                       "--config.model.num_classes=1000"),
    "unknown dataset": (lambda d: pvt_v2(d, input__dataset="imagenet2021"),
                        "unknown dataset 'imagenet2021' (did you mean: imagenet2012"),
    "mesh": (lambda d: pvt_v2(d, mesh__data=3), "mesh {'data': 3, 'fsdp': 1} does not fit 8"),
    "missing weights": (lambda d: pvt_v2(d, model_init="/nonexistent/w.safetensors"),
                        "weights file '/nonexistent/w.safetensors' does not exist"),
    # LaViT's Θ/Ψ are sized for model.img_size (224 here), the run trains at 32 px.
    "model size": (lambda d: make_config("lavit", "tiny", d, evals=True,
                                         **dict(FAMILIES["lavit"][2], img_size=224)),
                   "img_size"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_config_fails_before_anything_is_written(case, imagenet, tmp_path):
  make, expected = BAD[case]
  with mocked(imagenet):
    assert expected in one_line_error(make(imagenet), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  c = make_config("pvt_v2", "b0", str(tmp_path / "data"), **TINY)
  message = one_line_error(c, tmp_path / "run", kind=DataError)
  assert f"python -m effvit.data.prepare imagenet2012 --data_dir={tmp_path / 'data'}" in message
  assert "ILSVRC2012_img_train.tar" in message
  assert not (tmp_path / "run").exists()


def test_weights_of_another_model_fail_before_anything_is_written(imagenet, timm_weights,
                                                                  tmp_path):
  c = make_config("pvt_v2", "b0", imagenet, **dict(TINY, embed_dims=(32, 32, 32, 64)))
  c.model_init = timm_weights["safetensors"]
  with mocked(imagenet):
    message = one_line_error(c, tmp_path / "run", kind=ConfigError)
  assert "does not fit pvt_v2_b0" in message and "shape mismatch" in message
  assert not (tmp_path / "run").exists()


def snapshot(directory):
  return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns)
                for p in pathlib.Path(directory).rglob("*"))


def test_workdir_of_another_run_is_refused_untouched(imagenet, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  # config.json as the trainer writes it, for a run of pvt_v2_b0 with its own sr_ratios.
  (workdir / "config.json").write_text(
      make_config("pvt_v2", "b0", imagenet, **TINY).to_json_best_effort(indent=2))
  before = snapshot(workdir)
  other_model = make_config("pvt_v1", "tiny", imagenet, **TINY)
  other_ratios = make_config("pvt_v2", "b0", imagenet, **dict(TINY, sr_ratios=(4, 2, 1, 1)))
  with mocked(imagenet):
    assert "holds a run of pvt_v2_b0, not pvt_v1_tiny" in one_line_error(other_model, workdir)
    assert "model.sr_ratios=[8, 4, 2, 1], now [4, 2, 1, 1]" in one_line_error(other_ratios,
                                                                              workdir)
  assert snapshot(workdir) == before


def test_checkpoint_of_another_train_state_is_refused_untouched(imagenet, tmp_path):
  """A run resumed with EMA switched on (or another optimizer) cannot load its checkpoints:
  a one-line error, and the checkpoints are neither moved aside nor overwritten."""
  c = make_config("pvt_v2", "b0", imagenet, **TINY)
  devices = jax.devices()[:1]
  with mocked(imagenet):
    plain = trainer_for(c, tmp_path / "run", devices)
    zeros = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                         plain.abstract_state)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"))
    ckpt.save(1, zeros, plain.meta(1))
    ckpt.close()
    before = snapshot(tmp_path / "run")
    c.optimizer.ema_decay = 0.99
    message = one_line_error(c, tmp_path / "run", devices, kind=ConfigError)
  assert "checkpoint 1 in" in message and "ema_params" in message and "ema_decay" in message
  assert snapshot(tmp_path / "run") == before
