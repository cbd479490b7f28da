"""Command-line plumbing shared by train.py, eval.py and the tools.

`run(main)` parses `--config=<file>[:arg]`, `--config.a.b=value` overrides and `--workdir`,
starts multi-host JAX when asked to, and turns every user mistake into one line on stderr
(`error: ...`) with exit status 2: unknown config fields (with the closest names), values of
the wrong type, missing config files, and any EffvitError raised while validating the run.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from effvit.errors import ConfigError, EffvitError, closest  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, logs).")
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 for multi-host runs (or set "
                             "JAX_COORDINATOR_ADDRESS); clusters JAX detects need none.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_DIST = flags.DEFINE_bool("distributed", False,
                          "Call jax.distributed.initialize() with auto-detection (SLURM, ...).")


def _one_line(e: BaseException) -> str:
  text = str(e).strip().strip("'\"") or type(e).__name__
  return " ".join(text.replace("\\n", "\n").split("\n")[0].split())


def _lookup(cfg, path: str):
  node = cfg
  parts = path.split(".")
  for i, part in enumerate(parts):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(parts[:i]) or "config"
      raise ConfigError(f"unknown config field {path!r}: {where} has no {part!r}"
                        f"{closest(part, keys)}")
    node = node[part]


def parse_flags(argv: list[str]) -> None:
  """absl flag parsing with one-line ConfigErrors instead of tracebacks and usage dumps."""
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  try:
    flags.FLAGS([a for a in argv if not a.startswith("--config.")])
  except flags.Error as e:
    raise ConfigError(_one_line(e)) from None
  except Exception as e:  # errors raised while loading the config file or its get_config
    raise ConfigError(f"cannot load --config: {_one_line(e)}") from None
  if flags.FLAGS.config is None:
    raise ConfigError("--config is required, e.g. --config=configs/quickstart.py")
  for o in overrides:
    _lookup(flags.FLAGS.config, o[len("--config."):].split("=")[0])
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    raise ConfigError(_one_line(e)) from None
  except Exception as e:
    raise ConfigError(f"invalid override: {_one_line(e)}") from None


def init_distributed() -> None:
  """jax.distributed.initialize() when this is one process of a multi-process run."""
  import jax
  coord = _COORD.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (coord or _DIST.value):
    return
  if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if coord:
    kwargs = dict(coordinator_address=coord, num_processes=_NPROC.value,
                  process_id=_PID.value)
  jax.distributed.initialize(**kwargs)


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stderr)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable, argv: list[str] | None = None) -> None:
  """Parse flags, call main(config, workdir); exit 2 with one line on a user error."""
  argv = list(sys.argv if argv is None else argv)
  try:
    parse_flags(argv)
    setup_logging()
    init_distributed()
    result = main(flags.FLAGS.config, _WORKDIR.value)
  except EffvitError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(e.exit_code)
  sys.exit(0 if result is None or result is True else result)
