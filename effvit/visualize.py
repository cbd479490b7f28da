"""Attention maps of a pyramid model, drawn on the image they were computed for.

  python -m effvit.visualize --workdir=/tmp/effvit-quickstart --example=3
  python -m effvit.visualize --workdir=runs/b2 --image=photo.jpg --out=/tmp/maps
  python -m effvit.visualize --config=configs/pvt_v2.py:b0 --config.model_init=b0.safetensors \\
      --image=photo.jpg --out=/tmp/maps
  python -m effvit.visualize --config=configs/lavit.py:tiny --random_init --image=photo.jpg \\
      --out=/tmp/lavit

Weights come from the run's newest checkpoint (its config.json stands in for --config), from
config.model_init, or with --random_init from the model's initialiser; they are loaded the way
eval.py loads them (effvit.evaluate). The image is a file (preprocessed like evaluation: resize,
centre crop) or example N of the config's first eval dataset. The model runs once with the
"attention" collection mutable, so every attention layer sows its probabilities (B, h, N, M)
(effvit.attention.core; LaViT's VA and LA layers both sow theirs). Written under --out
(default <workdir>/attention):

  stage{i}_block{j}_{kind}.png  heads x query points: each query's weights over the image
  stage{i}_va_vs_la.png         LaViT stages with LA layers: the head-mean map of every "less"
                                layer side by side, VA first, for each query point
  attention_similarity.png      cosine similarity of each layer's attention to the previous
                                layer of its stage with the same shape, against the block
                                index (LaViT: the "attention saturation" curve)

Weights are shown on the stage's token grid, where query and key tokens are aligned with the
pixels they came from: token (r, c) of a stage with cumulative stride S is centred on pixel
(r·S, c·S) for overlapping patch embeddings (PVTv2, LaViT: kernel 2s-1, padding s-1) and covers
pixels [r·S, (r+1)·S) for non-overlapping ones. A reduced key stands for the tokens it was
computed from: each token gets the key's weight times that token's share of the key
(SRA: the R×R cell of the k = s = R conv, 1/R² each; linear SRA: its adaptive-average bins),
so a map sums to 1 over the grid. LSA maps are blank outside the query's window.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import sys

import numpy as np
from absl import flags

from effvit import cli
from effvit.errors import ConfigError

_IMAGE = flags.DEFINE_string("image", None, "An image file (JPEG, PNG) to draw the maps on.")
_EXAMPLE = flags.DEFINE_integer("example", None, "Use example N of the config's first eval "
                                "dataset instead of --image.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/attention).")
_RANDOM = flags.DEFINE_bool("random_init", False, "Visualise the model's random initialisation "
                            "(no checkpoint or model_init needed).")
_QUERIES = flags.DEFINE_string("queries", "0.5,0.5;0.3,0.3;0.3,0.7;0.7,0.45",
                               "Query points as y,x fractions of the image, ';'-separated.")
_HEADS = flags.DEFINE_integer("max_heads", 8, "Draw at most this many heads per layer.")

log = logging.getLogger("effvit")
Grid = tuple[int, int]


@dataclasses.dataclass
class Layer:
  """One attention layer's sown probabilities for the first image, and how to read them."""
  stage: int
  block: int
  kind: str            # mhsa | sra | linear_sra | lsa | va | la (the last two: LaViT "less")
  probs: np.ndarray    # (h, N, M); LSA: (windows, h, k², k²)
  hw: Grid             # query token grid
  stride: int          # pixels per token step
  offset: float        # pixel coordinate of token 0's left/top edge
  sr_ratio: int = 1
  pool_size: int = 0
  window: int = 0

  @property
  def heads(self) -> int:
    return self.probs.shape[-3]

  def label(self) -> str:
    what = {"mhsa": "global MHSA", "sra": f"SRA R={self.sr_ratio}",
            "linear_sra": f"linear SRA {self.pool_size}x{self.pool_size}",
            "lsa": f"LSA {self.window}x{self.window} windows",
            "va": f"LaViT VA (R={self.sr_ratio})", "la": f"LaViT LA (R={self.sr_ratio})"}
    return what[self.kind]

  def query_map(self, r: int, c: int, head: int) -> np.ndarray:
    """(H, W) weights of query token (r, c) over the token grid; NaN where it has no key."""
    h, w = self.hw
    if self.kind == "lsa":
      k = self.window
      nw = -(-w // k)
      a = self.probs[(r // k) * nw + c // k, head, (r % k) * k + c % k]
      out = np.full((-(-h // k) * k, nw * k), np.nan, np.float32)
      top, left = (r // k) * k, (c // k) * k
      out[top:top + k, left:left + k] = a.reshape(k, k)
      return out[:h, :w]
    n = h * w
    extra = self.probs.shape[-2] - n            # a cls token (PVTv1's last stage) comes first
    a = self.probs[head, extra + r * w + c, extra:]
    return (a if self.key_tokens is None else a @ self.key_tokens).reshape(h, w)

  @functools.cached_property
  def key_tokens(self) -> np.ndarray | None:
    """(M, N): each key's share of every query-grid token; None: keys are the tokens."""
    from effvit.attention.spatial_reduction import adaptive_pool_matrix
    h, w = self.hw
    if self.kind == "linear_sra":
      p = self.pool_size
      return np.kron(adaptive_pool_matrix(h, p), adaptive_pool_matrix(w, p))
    r = self.sr_ratio
    if r == 1:
      return None
    cells = lambda size: np.kron(np.eye(size // r, dtype=np.float32),
                                 np.full((1, r), 1.0 / r, np.float32))
    pad = lambda m, size: np.pad(m, ((0, 0), (0, size - m.shape[1])))   # floor: edge left out
    return np.kron(pad(cells(h), h), pad(cells(w), w))


def collect(cfg, attention: dict, image_hw: Grid) -> list[Layer]:
  """The sown probabilities of every block, in order, with each block's geometry."""
  from effvit.models.pyramid import block_mixer_kinds
  grids = cfg.token_grids(image_hw)
  layers, stride = [], 1
  for i, g in enumerate(grids):
    stride *= cfg.patch_strides[i]
    offset = 0.5 - stride / 2 if cfg.overlap_patch_embed else 0.0
    roles = cfg.less_roles(i)
    stage = attention.get(f"stages_{i}", {})
    for j, kind in enumerate(block_mixer_kinds(cfg.mixers[i], cfg.depths[i])):
      sown = stage.get(f"blocks_{j}", {}).get("attn", {}).get("probs")
      if sown is None:
        continue
      probs = np.asarray(sown[0], np.float32)
      if kind == "lsa":
        k = cfg.windows[i]
        probs = probs[:(-(-g[0] // k)) * (-(-g[1] // k))]   # the first image's windows
      else:
        probs = probs[0]
      layers.append(Layer(i, j, roles[j] or kind, probs, g, stride, offset,
                          sr_ratio=1 if kind == "mhsa" else cfg.sr_ratios[i],
                          pool_size=cfg.pool_sizes[i], window=cfg.windows[i]))
  return layers


@dataclasses.dataclass
class Similarity:
  stage: int
  block: int
  layer: int           # index of the layer in the whole network (0-based)
  kind: str
  cosine: float        # of the two layers' probabilities, flattened
  centred: float       # the same after subtracting each query row's mean (1/M): the uniform
                       # part every softmax shares no longer counts (an untrained model's
                       # attention is near uniform, so its raw cosine is near 1 everywhere)


def similarities(layers: list[Layer]) -> list[Similarity]:
  """Each layer against the previous layer of its stage whose attention has the same shape."""
  def cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
  centre = lambda p: p - p.mean(axis=-1, keepdims=True)
  out = []
  for i, layer in enumerate(layers):
    prev = next((p for p in reversed(layers[:i])
                 if p.stage == layer.stage and p.probs.shape == layer.probs.shape), None)
    if prev is not None:
      out.append(Similarity(layer.stage, layer.block, i, layer.kind, cos(prev.probs, layer.probs),
                            cos(centre(prev.probs), centre(layer.probs))))
  return out


def query_tokens(queries: list[tuple[float, float]], hw: Grid) -> list[Grid]:
  return [(min(int(fy * hw[0]), hw[0] - 1), min(int(fx * hw[1]), hw[1] - 1))
          for fy, fx in queries]


def parse_queries(text: str) -> list[tuple[float, float]]:
  try:
    out = [tuple(float(v) for v in q.split(",")) for q in text.split(";") if q.strip()]
  except ValueError:
    out = []
  if not out or any(len(q) != 2 or not all(0 <= v <= 1 for v in q) for q in out):
    raise ConfigError(f"--queries={text!r}: expected y,x fractions in [0, 1], ';'-separated, "
                      "e.g. 0.5,0.5;0.25,0.75")
  return out


# --- drawing ----------------------------------------------------------------------------------

def _overlay(ax, image: np.ndarray, layer: Layer, weights: np.ndarray, rc: Grid) -> None:
  h, w = layer.hw
  s, o = layer.stride, layer.offset
  ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
  lo, hi = weight_range(weights)
  # Min-max per map: an untrained model's attention is near uniform, and its structure would
  # vanish on a scale from 0 (the titles give the range).
  ax.imshow(np.ma.masked_invalid(weights), cmap="inferno", alpha=0.6, vmin=lo,
            vmax=max(hi, lo + 1e-12), extent=(o, o + w * s, o + h * s, o),
            interpolation="nearest")
  ax.plot(o + (rc[1] + 0.5) * s, o + (rc[0] + 0.5) * s, marker="+", ms=11, mew=2.2, color="cyan")
  ax.set_xlim(0, image.shape[1])
  ax.set_ylim(image.shape[0], 0)
  ax.tick_params(labelsize=6)


def weight_range(weights: np.ndarray) -> tuple[float, float]:
  finite = weights[np.isfinite(weights)]
  return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def _range_text(weights: np.ndarray) -> str:
  lo, hi = weight_range(weights)
  return f"w {lo:.2g}..{hi:.2g}"


def _save(fig, path: str) -> str:
  fig.savefig(path)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path


def draw_layer(layer: Layer, image: np.ndarray, queries, max_heads: int, title: str,
               path: str) -> str:
  import matplotlib.pyplot as plt
  heads = min(layer.heads, max_heads)
  tokens = query_tokens(queries, layer.hw)
  fig, axes = plt.subplots(heads, len(tokens),
                           figsize=(max(2.4 * len(tokens), 6.5), 2.4 * heads + 0.9),
                           dpi=110, squeeze=False)
  for hd in range(heads):
    for q, rc in enumerate(tokens):
      ax = axes[hd, q]
      weights = layer.query_map(*rc, hd)
      _overlay(ax, image, layer, weights, rc)
      ax.set_title(f"head {hd}, query ({rc[0]},{rc[1]})\n{_range_text(weights)}", fontsize=7)
      if q == 0:
        ax.set_ylabel("y (px)", fontsize=7)
      if hd == heads - 1:
        ax.set_xlabel("x (px)", fontsize=7)
  more = f" (first {heads} of {layer.heads} heads)" if heads < layer.heads else ""
  fig.suptitle(f"{title}\nstage {layer.stage + 1} block {layer.block}: {layer.label()}, "
               f"{layer.hw[0]}x{layer.hw[1]} tokens{more}; + = query, colour = weight "
               "(min-max per map)", fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def draw_va_vs_la(stage_layers: list[Layer], image: np.ndarray, queries, title: str,
                  path: str) -> str:
  """Head-mean maps of a LaViT stage's "less" layers side by side, one row per query."""
  import matplotlib.pyplot as plt
  tokens = query_tokens(queries, stage_layers[0].hw)
  cols = len(stage_layers)
  fig, axes = plt.subplots(len(tokens), cols,
                           figsize=(max(2.6 * cols, 6.5), 2.6 * len(tokens) + 1.0),
                           dpi=110, squeeze=False)
  for q, rc in enumerate(tokens):
    for c, layer in enumerate(stage_layers):
      mean = np.mean([layer.query_map(*rc, hd) for hd in range(layer.heads)], axis=0)
      ax = axes[q, c]
      _overlay(ax, image, layer, mean, rc)
      ax.set_title(f"block {layer.block} {layer.kind.upper()}, query ({rc[0]},{rc[1]})\n"
                   f"{_range_text(mean)}", fontsize=7)
      if c == 0:
        ax.set_ylabel("y (px)", fontsize=7)
      if q == len(tokens) - 1:
        ax.set_xlabel("x (px)", fontsize=7)
  fig.suptitle(f"{title}\nstage {stage_layers[0].stage + 1}: vanilla attention (VA) vs less "
               "attention (LA: the transformed VA matrix)\nmean over heads; + = query, colour = "
               "weight (min-max per map)", fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def draw_similarity(sims: list[Similarity], layers: list[Layer], title: str, path: str) -> str:
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  fig, ax = plt.subplots(figsize=(8.6, 4.4), dpi=110)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  handles = []
  for stage in sorted({s.stage for s in sims}):
    pts = [s for s in sims if s.stage == stage]
    c = colours[stage % len(colours)]
    x = [s.layer for s in pts]
    ax.plot(x, [s.cosine for s in pts], color=c, lw=1.5)
    ax.plot(x, [s.centred for s in pts], color=c, lw=1.2, ls="--")
    for s in pts:
      fill = c if s.kind == "la" else "white"
      ax.plot(s.layer, s.cosine, marker="o", color=c, mfc=fill, ms=7)
      ax.plot(s.layer, s.centred, marker="^", color=c, mfc=fill, ms=7)
    handles.append(Line2D([], [], color=c, lw=2, label=f"stage {stage + 1}"))
  handles += [Line2D([], [], color="0.3", marker="o", mfc="white", label="cosine"),
              Line2D([], [], color="0.3", marker="^", ls="--", mfc="white",
                     label="centred cosine\n(row means removed)")]
  if any(s.kind == "la" for s in sims):
    handles.append(Line2D([], [], color="0.3", marker="o", ls="", label="filled: LA layer"))
  for b in [i for i in range(1, len(layers)) if layers[i].stage != layers[i - 1].stage]:
    ax.axvline(b - 0.5, color="0.6", lw=0.8, ls=":")
  less = any(l.kind in ("va", "la") for l in layers)
  if not sims:
    ax.text(0.5, 0.5, "no stage has two attention layers of the same shape", ha="center",
            va="center", transform=ax.transAxes, fontsize=9)
  ax.set_xlim(-0.5, len(layers) - 0.5)
  ax.set_xlabel("attention layer index in the network (dotted: stage boundaries)")
  ax.set_ylabel("similarity to the previous layer\nof the stage with the same shape")
  ax.set_ylim(min([0.0] + [s.centred - 0.05 for s in sims]), 1.05)
  ax.grid(alpha=0.3)
  ax.set_title(f"{title}\nlayer-to-layer attention similarity"
               + (" (LaViT: attention saturation)" if less else ""), fontsize=9)
  if sims:
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.xaxis.get_major_locator().set_params(integer=True)
  fig.tight_layout()
  return _save(fig, path)


# --- inputs and weights ---------------------------------------------------------------------

def eval_entry(config):
  """The first eval entry (its preprocessing), or default evaluation at the training size."""
  from effvit.data import pipeline
  evals = config.get("evals") or {}
  if evals:
    return next(iter(evals.values()))
  entry = pipeline.default_eval_config()
  entry.image_size = config.input.image_size
  return entry


def load_image(path: str, entry) -> np.ndarray:
  import tensorflow as tf
  from effvit.data import pipeline, transforms
  pipeline.tf_on_cpu_only()
  if not os.path.isfile(path):
    raise ConfigError(f"--image={path} does not exist")
  try:
    image = transforms.eval_image(tf.io.read_file(path), image_size=entry.image_size,
                                  crop_pct=entry.crop_pct, interpolation=entry.interpolation,
                                  mean=tuple(entry.mean), std=tuple(entry.std))
  except tf.errors.InvalidArgumentError:
    raise ConfigError(f"--image={path} is not a readable JPEG/PNG/GIF/BMP image") from None
  return image.numpy()


def load_example(entry, index: int) -> tuple[np.ndarray, int]:
  from effvit.data import pipeline
  n = pipeline.dataset_info(entry.dataset, entry.split, entry.get("data_dir"))[1]
  if not 0 <= index < n:
    raise ConfigError(f"--example={index}: {entry.dataset} {entry.split} has {n} examples")
  skip = index
  if "[" not in entry.split:   # read only that example (TFDS cannot slice a slice)
    entry = copy.deepcopy(entry)
    with entry.unlocked():
      entry.split, skip = f"{entry.split}[{index}:{index + 1}]", 0
  _, batches = pipeline.eval_batches(entry, local_batch_size=1)
  for i, batch in enumerate(batches):
    if i == skip:
      return batch["image"][0], int(np.asarray(batch["label"][0]).reshape(-1)[0])
  raise AssertionError("unreachable")


def load_config(config, workdir: str | None):
  if config is not None:
    return config
  path = os.path.join(workdir or "", "config.json")
  if not workdir or not os.path.exists(path):
    raise ConfigError("give --config=FILE, or --workdir of a run (its config.json is used)")
  import ml_collections
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def model_variables(config, model, workdir: str | None, random_init: bool, x: np.ndarray):
  import jax
  if random_init:
    variables = jax.jit(model.init)(jax.random.key(config.get("seed", 0)), x)
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}, "random init"
  from effvit.evaluate import find_weights, load_variables
  from effvit.train import sharding
  weights = find_weights(config, workdir, None)
  mesh = sharding.make_mesh(config.get("mesh") or {"data": -1, "fsdp": 1})
  variables, step = load_variables(config, model, mesh, weights)
  source = f"step {step}" if weights.kind == "checkpoint" else os.path.basename(weights.path)
  return jax.device_get(variables[""]), source


def visualize(config, workdir: str | None, *, image: str | None = None,
              example: int | None = None, out: str | None = None, random_init: bool = False,
              queries: str = _QUERIES.default, max_heads: int = 8) -> list[str]:
  """Writes the PNGs (see the module docstring); returns their paths."""
  import jax
  import matplotlib
  matplotlib.use("Agg")
  from effvit.models import create_model
  from effvit.models.pyramid import PyramidConfig

  config = load_config(config, workdir)
  points = parse_queries(queries)
  if (image is None) == (example is None):
    raise ConfigError("give exactly one of --image=FILE and --example=N")
  out = out or (os.path.join(workdir, "attention") if workdir else None)
  if not out:
    raise ConfigError("give --out=DIR (or --workdir, which writes to <workdir>/attention)")
  if max_heads < 1:
    raise ConfigError(f"--max_heads must be positive, got {max_heads}")
  model = create_model(config.model_name, **config.model)
  cfg = getattr(model, "config", None)
  if not isinstance(cfg, PyramidConfig):
    raise ConfigError(f"{config.model_name} has no token attention to draw (only the pyramid "
                      "transformers do: PVT, PVTv2, Twins, LaViT)")
  entry = eval_entry(config)
  label = None
  if image is not None:
    x = load_image(image, entry)
    source = os.path.basename(image)
  else:
    x, label = load_example(entry, example)
    source = f"{entry.dataset} {entry.split} #{example}"
  variables, weights = model_variables(config, model, workdir, random_init, x[None])
  logits, state = model.apply(variables, x[None], train=False, mutable=["attention"])
  layers = collect(cfg, jax.device_get(state.get("attention", {})), x.shape[:2])
  if not layers:
    raise ConfigError(f"{config.model_name} sowed no attention probabilities")
  probs = np.asarray(jax.nn.softmax(logits[0]))
  pred = int(probs.argmax())
  shown = np.clip(x * np.asarray(entry.std) + np.asarray(entry.mean), 0.0, 1.0)
  title = (f"{config.model_name} ({weights}) on {source}: predicted class {pred} "
           f"(p={probs[pred]:.2f})" + (f", label {label}" if label is not None else ""))
  os.makedirs(out, exist_ok=True)
  paths = []
  for layer in layers:
    name = f"stage{layer.stage + 1}_block{layer.block}_{layer.kind}.png"
    paths.append(draw_layer(layer, shown, points, max_heads, title, os.path.join(out, name)))
  for stage in sorted({l.stage for l in layers if l.kind == "la"}):
    group = [l for l in layers if l.stage == stage and l.kind in ("va", "la")]
    paths.append(draw_va_vs_la(group, shown, points, title,
                               os.path.join(out, f"stage{stage + 1}_va_vs_la.png")))
  sims = similarities(layers)
  paths.append(draw_similarity(sims, layers, title,
                               os.path.join(out, "attention_similarity.png")))
  for sim in sims:
    log.info("stage %d block %d (%s): cosine %.4f, centred %.4f to the previous layer",
             sim.stage + 1, sim.block, sim.kind, sim.cosine, sim.centred)
  print(f"{title}\nwrote {len(paths)} PNGs to {out}", flush=True)
  return paths


def main(config, workdir):
  visualize(config, workdir, image=_IMAGE.value, example=_EXAMPLE.value, out=_OUT.value,
            random_init=_RANDOM.value, queries=_QUERIES.value, max_heads=_HEADS.value)


if __name__ == "__main__":
  cli.run(main, sys.argv, require_config=False)
