"""Timing and memory helpers shared by `python -m effvit.profile` and benchmarks/*.py.

Everything here times compiled work only: effvit's functions are compiled ahead of time
(`jax.jit(f).lower(*args).compile()`, which also gives the compile time and XLA's memory
analysis), warmed up, and every timed call blocks until its result is ready. timm is run eagerly
in eval mode under `torch.inference_mode()` for inference and with AdamW for training, on the
device JAX uses (a CUDA GPU or the CPU), and also waits for its results.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], steps: int) -> float:
  """Seconds per call over `steps` calls (fn must block until its result is ready)."""
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t) / steps


def interleave(runners: dict, steps: int, reps: int, warmup: int = 0) -> dict:
  """{name: median seconds per call}, alternating the runners in every repetition (so a
  change in machine load hits all of them alike), after `warmup` untimed alternating calls.

  Alternate the warm-up too: runners in one process share its heap, and the first steps after
  another runner's allocations still fault pages in (3 steps for pvt_v2_b2 at batch 32)."""
  for _ in range(warmup):
    for fn in runners.values():
      fn()
  times = {k: [] for k in runners}
  for _ in range(reps):
    for k, fn in runners.items():
      times[k].append(timed(fn, steps))
  return {k: statistics.median(v) for k, v in times.items()}


def warm(fn: Callable[[], object], calls: int = 2) -> float:
  """Runs fn `calls` times; returns the seconds of the first call (compilation included)."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  for _ in range(calls - 1):
    fn()
  return first


def set_threads(n: int = 0) -> int:
  """Restrict this process to n cores (0: keep all usable) before JAX/torch create thread
  pools; returns the core count. XLA:CPU sizes its pool from the affinity mask."""
  cores = sorted(os.sched_getaffinity(0))
  if n:
    if n > len(cores):
      raise SystemExit(f"--threads {n}: only {len(cores)} cores are usable")
    cores = cores[:n]
    os.sched_setaffinity(0, cores)
  return len(cores)


def aot_compile(fn: Callable, *args, donate_argnums=(), kind: str | None = None, dtype=None):
  """(compiled, seconds): jit + lower + compile fn for these arguments (arrays or
  ShapeDtypeStructs); `kind` ("inference" / "train") compiles with effvit.xla_cpu's options
  for that step and compute `dtype`, as train.py and eval.py do."""
  import jax
  from effvit.xla_cpu import compiler_options
  options = compiler_options(kind, dtype) if kind else None
  t = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums, compiler_options=options).lower(
      *args).compile()
  return compiled, time.perf_counter() - t


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's static memory plan of a compiled function, in bytes: temporaries, arguments, outputs
  and `peak` = their sum less donated (aliased) buffers, which are counted once."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes,
         "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes}
  out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
  return out


def device_peak_bytes() -> int | None:
  """The allocator's peak bytes in use on device 0 (GPU/TPU), None where not reported (CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def model_for(name: str, overrides: dict, res: int, dtype: str = "float32"):
  """Registry model `name` in `dtype`, built for `res`-pixel inputs where it has an img_size
  (LaViT's Θ/Ψ are sized by it; an explicit override wins)."""
  from effvit.models import create_model
  from effvit.models.registry import model_fields
  if "img_size" in model_fields(name):
    overrides = {"img_size": res, **overrides}
  return create_model(name, dtype=dtype, **overrides)


class EffvitRunner:
  """A model's compiled inference and train step (effvit.train.state.train_step: forward,
  backward, optax AdamW, donated state) on random images and labels."""

  def __init__(self, model, batch: int, res: int, *, num_classes: int | None = None,
               in_chans: int = 3, seed: int = 0, modes=("inference", "train")):
    """`modes`: the steps to compile (on a GPU each can take minutes)."""
    import jax
    import jax.numpy as jnp
    import optax
    from effvit.models import compute_dtype
    from effvit.train.optimizer import decay_mask
    from effvit.train.state import create_state, train_step

    cfg = getattr(model, "config", model)
    num_classes = num_classes or getattr(cfg, "num_classes", 1000)
    k1, k2 = jax.random.split(jax.random.key(seed))
    self.x = jax.random.normal(k1, (batch, res, res, in_chans), jnp.float32)
    self.y = jax.random.randint(k2, (batch,), 0, num_classes)
    tx = optax.adamw(1e-3, weight_decay=0.05, mask=decay_mask)
    self.state = jax.jit(lambda r: create_state(model, tx, r, (1, res, res, in_chans),
                                                ema=False))(jax.random.key(seed))
    self.variables = {"params": self.state.params}
    if self.state.batch_stats:
      self.variables["batch_stats"] = self.state.batch_stats
    step = lambda state, b: train_step(
        state, b, model=model, tx=tx, base_rng=jax.random.key(seed + 1), num_classes=num_classes,
        mixup={}, aux_weights={"dp_loss": 0.1}, ema_decay=0.0)
    self._batch = {"image": self.x, "label": self.y}
    build = {"inference": lambda: aot_compile(lambda v, x: model.apply(v, x), self.variables,
                                              self.x, kind="inference"),
             "train": lambda: aot_compile(step, self.state, self._batch, donate_argnums=(0,),
                                          kind="train", dtype=compute_dtype(model))}
    built = {mode: build[mode]() for mode in modes}
    self.compiled = {mode: c for mode, (c, _) in built.items()}
    self.compile_seconds = {mode: s for mode, (_, s) in built.items()}
    self.memory = {mode: compiled_memory(c) for mode, c in self.compiled.items()}

  @classmethod
  def from_name(cls, name: str, overrides: dict, batch: int, res: int, dtype: str = "float32",
                modes=("inference", "train")):
    """By registry name, in `dtype` (`model_for`); `.gmacs` is the float32 model's count."""
    from effvit.profile import model_cost
    runner = cls(model_for(name, overrides, res, dtype), batch, res, modes=modes)
    runner.gmacs = model_cost(model_for(name, overrides, res), res)["gmacs"]
    return runner

  def infer(self):
    self.compiled["inference"](self.variables, self.x).block_until_ready()

  def train(self):
    self.state, metrics = self.compiled["train"](self.state, self._batch)
    metrics["loss"].block_until_ready()


def torch_device() -> str:
  """The torch device matching JAX's backend: "cuda" when JAX runs on a GPU, else "cpu"."""
  import jax
  import torch
  if jax.default_backend() != "gpu":
    return "cpu"
  if not torch.cuda.is_available():
    raise SystemExit("JAX runs on the GPU but this torch has no CUDA: install a CUDA build of "
                     "torch, or set JAX_PLATFORMS=cpu to compare on the CPU")
  return "cuda"


class TimmRunner:
  """timm eager (or torch.compile'd) inference and AdamW train step on random inputs, on the
  device JAX uses (`torch_device`); bfloat16 is autocast (timm's AMP), float32 parameters."""

  def __init__(self, name: str, batch: int, res: int, dtype: str = "float32",
               compiled: bool = False, device: str | None = None, **model_kwargs):
    import torch
    from effvit.reference import timm_model

    self.torch = torch
    self.device = device or torch_device()
    if self.device == "cuda":
      torch.backends.cudnn.benchmark = True   # timm's own benchmark sets it: fixed shapes
    torch.manual_seed(0)
    self.model = timm_model(name, **model_kwargs).to(self.device)
    self.x = torch.randn(batch, 3, res, res, device=self.device)
    self.y = torch.randint(0, self.model.num_classes, (batch,), device=self.device)
    self.autocast = dtype == "bfloat16"
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
    self.fn = torch.compile(self.model) if compiled else self.model

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def _ctx(self):
    import contextlib
    return (self.torch.autocast(self.device, dtype=self.torch.bfloat16) if self.autocast
            else contextlib.nullcontext())

  def _wait(self):
    """CUDA calls return before the GPU is done; time until it is."""
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def infer(self):
    self.model.eval()
    with self.torch.inference_mode(), self._ctx():
      self.fn(self.x)
    self._wait()

  def train(self):
    self.model.train()
    with self._ctx():
      loss = self.torch.nn.functional.cross_entropy(self.fn(self.x), self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self._wait()
