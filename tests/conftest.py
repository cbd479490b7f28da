"""Shared test setup: 8 simulated CPU devices, quiet TensorFlow, optional reference models."""
import os

# Must happen before JAX initialises its backend: sharding tests need 8 devices; every other
# test runs on device 0 as usual. Most tests compile tiny models, where LLVM's optimisation is
# most of the compile time: without it the suite ran in 7.5 instead of 10.3 minutes on 2 cores,
# and every test passes either way (per-jit compiler options, e.g. the train step's YNNPACK
# routing, still apply). Set XLA_FLAGS yourself to test the optimised build (README, Tests).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# cli.run (run in-process by several tests) would turn on jax's persistent compilation cache
# for the rest of the session and write to ~/.cache: tests that want it set a directory.
os.environ.setdefault("EFFVIT_COMPILATION_CACHE", "0")

import gc
import logging
import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def pytest_sessionfinish(session):
  """Collect once, then freeze the survivors: pytest's unconfigure runs 5 full collections
  over every object a worker's jit caches still hold (0.33 s each after just two test
  files), and xdist's execnet interrupts a worker still busy 5 s after the session (the
  KeyboardInterrupt printed at the end of full runs)."""
  gc.collect()
  gc.freeze()


@pytest.fixture(scope="session")
def timm():
  """timm (with the torchvision stand-in if needed); skips without the `reference` extra."""
  try:
    from effvit.reference import import_timm
    return import_timm()
  except ModuleNotFoundError as e:
    pytest.skip(f"reference extra not installed ({e.name} missing): "
                "pip install -e '.[reference]' && pip install --no-deps timm==1.0.31")


@pytest.fixture(scope="session")
def imagenet_sample():
  path = SHARED / "data" / "imagenet-sample"
  if not path.is_dir():
    pytest.skip(f"{path} not present (real-JPEG tests need ../shared beside the checkout)")
  return path


@pytest.fixture
def restore_logging():
  """cli.run points the root logger at this test's (captured) stderr: undo that afterwards."""
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  yield
  root.handlers[:] = handlers
  root.setLevel(level)


@pytest.fixture
def single_device(monkeypatch):
  """The suite simulates 8 devices, where effvit's C++ kernels are off (an FFI call has no
  sharding rule); tests that use unsharded arrays, as a single-device run does, turn them on."""
  from effvit import cpu_kernels
  monkeypatch.setattr(cpu_kernels, "_single_device", lambda: True)


@pytest.fixture(params=["0", "1"], ids=["cpu_rewrites", "native_convs"])
def native_convs(request, monkeypatch):
  """Both ways of building the conv modules (effvit.layers.native_convs): XLA:CPU's rewrites
  and XLA's own grouped and strided convs."""
  monkeypatch.setenv("EFFVIT_NATIVE_CONVS", request.param)
  return request.param == "1"
