"""`python -m effvit.visualize`: where each mechanism's weights land on the token grid, the
similarity measure, and the PNGs written for a tiny quickstart-like model, from its random
initialisation and from a run's checkpoint (config taken from the run's config.json)."""
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from effvit import visualize as vis

ROOT = pathlib.Path(__file__).resolve().parents[1]


def layer(kind, probs, hw, **kw):
  return vis.Layer(0, 0, kind, np.asarray(probs, np.float32), hw, stride=4, offset=0.0, **kw)


def test_sra_key_spreads_over_its_cell():
  probs = np.zeros((1, 16, 4))
  probs[0, 5, 1] = 1.0                          # query (1, 1) attends to key cell (0, 1)
  m = layer("sra", probs, (4, 4), sr_ratio=2).query_map(1, 1, 0)
  expected = np.zeros((4, 4))
  expected[0:2, 2:4] = 0.25
  np.testing.assert_allclose(m, expected)
  # Floor sizes: a 5x5 grid with R = 2 has 2x2 keys; the last row and column feed no key.
  probs = np.full((1, 25, 4), 0.25)
  m = layer("la", probs, (5, 5), sr_ratio=2).query_map(4, 4, 0)
  assert m.sum() == pytest.approx(1.0) and not m[4].any() and not m[:, 4].any()


def test_linear_sra_and_global_maps_sum_to_one():
  rng = np.random.default_rng(0)
  p = rng.random((2, 36, 9))
  p /= p.sum(-1, keepdims=True)
  m = layer("linear_sra", p, (6, 6), pool_size=3).query_map(2, 3, 1)
  assert m.shape == (6, 6) and m.sum() == pytest.approx(1.0, abs=1e-5)
  # PVTv1's last stage: a cls token leads queries and keys; the map is over the grid tokens.
  p = np.zeros((1, 5, 5))
  p[0, 1 + 3, 1 + 2] = 1.0
  m = layer("mhsa", p, (2, 2)).query_map(1, 1, 0)
  np.testing.assert_array_equal(m, [[0, 0], [1, 0]])


def test_lsa_map_is_the_query_window():
  k = 2                                         # 3x3 grid, padded to 4x4: 4 windows
  probs = np.zeros((4, 1, k * k, k * k))
  probs[2, 0, 1] = [0.1, 0.2, 0.3, 0.4]         # window (1, 0), query at in-window (0, 1)
  m = layer("lsa", probs, (3, 3), window=k).query_map(2, 1, 0)
  assert m.shape == (3, 3)
  np.testing.assert_allclose(m[2, :2], [0.1, 0.2])   # the padded row 3 is cropped
  assert np.isnan(m[:2]).all() and np.isnan(m[2, 2])


def test_similarities_pair_layers_of_the_same_shape():
  a = np.random.default_rng(0).random((1, 4, 4))
  layers = [layer("va", a, (2, 2)), vis.Layer(0, 1, "la", a * 2, (2, 2), 4, 0.0),
            vis.Layer(1, 0, "va", a, (2, 2), 8, 0.0)]   # another stage: not compared
  sims = vis.similarities(layers)
  assert [(s.stage, s.block, s.kind) for s in sims] == [(0, 1, "la")]
  assert sims[0].cosine == pytest.approx(1.0) and sims[0].centred == pytest.approx(1.0)


def tiny_config(data_dir=None):
  import sys
  sys.path.insert(0, str(ROOT))
  from configs import quickstart
  c = quickstart.get_config()
  # Two blocks per stage (so there are layers to compare), LSA/SRA alternation in stage 1.
  c.model.depths, c.model.windows = (2, 2, 1, 1), (4, 4, 4, 4)
  c.model.mixers = ("lsa/sra", "sra", "linear_sra", "mhsa")
  c.model.pool_sizes = (2, 2, 2, 2)
  if data_dir:
    c.evals.test.data_dir = c.input.data_dir = data_dir
  return c


def test_random_init_writes_pngs(tmp_path):
  image = tmp_path / "x.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
  paths = vis.visualize(tiny_config(), None, image=str(image), out=str(tmp_path / "out"),
                        random_init=True)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["attention_similarity.png", "stage1_block0_lsa.png", "stage1_block1_sra.png",
                   "stage2_block0_sra.png", "stage2_block1_sra.png",
                   "stage3_block0_linear_sra.png", "stage4_block0_mhsa.png"]
  for p in paths:
    assert Image.open(p).size[0] > 300


def test_checkpoint_of_a_run_and_an_eval_example(tmp_path, monkeypatch, capsys):
  import jax
  import optax
  from effvit import cli
  from effvit.models import create_model
  from effvit.train.checkpoint import Checkpointer
  from effvit.train.state import create_state

  workdir = tmp_path / "run"
  config = tiny_config(str(tmp_path / "tfds"))
  model = create_model(config.model_name, **config.model)
  state = create_state(model, optax.adamw(1e-3), jax.random.key(0), (1, 32, 32, 3), ema=False)
  ckpt = Checkpointer(str(workdir), asynchronous=False)
  ckpt.save(0, state, {})
  ckpt.close()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(vis.main, ["visualize", f"--workdir={workdir}", "--example=2", "--max_heads=2"],
            require_config=False)
  out, err = capsys.readouterr()
  assert exit_info.value.code == 0, err
  assert "(step 0) on sklearn_digits test #2" in out and ", label " in out
  written = sorted(os.listdir(workdir / "attention"))
  assert "attention_similarity.png" in written and len(written) == 7

  with pytest.raises(SystemExit) as exit_info:   # no --config and no run: one line, status 2
    cli.run(vis.main, ["visualize", "--example=0", "--out=x"], require_config=False)
  _, err = capsys.readouterr()
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert exit_info.value.code == 2 and len(errors) == 1 and "give --config" in errors[0]
