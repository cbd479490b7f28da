"""Command-line plumbing shared by train.py, eval.py and the tools.

`run(main)` parses `--config=<file>[:arg]`, `--config.a.b=value` overrides and `--workdir`,
starts multi-host JAX when asked to, and turns every user mistake into one line on stderr
(`error: ...`) with exit status 2: unknown config fields (with the closest names), values of
the wrong type, missing config files, and any EffvitError raised while validating the run.
"""
from __future__ import annotations

import importlib.machinery
import ast
import logging
import os
import re
import sys
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from ml_collections.config_flags import tuple_parser  # noqa: E402

from effvit.errors import ConfigError, EffvitError, closest  # noqa: E402

# config_flags defines the `--config.a.b` flags while parsing `--config`, from the argv it is
# given here; parse_flags fills it (config_flags reads sys.argv otherwise, whatever we parse).
_ARGV: list[str] = []
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True,
                                          sys_argv=_ARGV)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, logs).")
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 for multi-host runs (or set "
                             "JAX_COORDINATOR_ADDRESS); clusters JAX detects need none.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_DIST = flags.DEFINE_bool("distributed", False,
                          "Call jax.distributed.initialize() with auto-detection (SLURM, ...).")
_OVERRIDE = re.compile(r"^--?(no)?config\.")


class _TupleParser(tuple_parser.TupleParser):
  """ml_collections' tuple parser, plus bare strings: `--config.model.mixers=lsa/sra,sra,sra,sra`
  (it would read that as a 1-tuple holding the whole text)."""

  def parse(self, argument):
    if isinstance(argument, str) and "," in argument:
      try:
        ast.literal_eval(argument)
      except (ValueError, SyntaxError):
        return tuple(_literal(p.strip()) for p in argument.strip("()").split(",") if p.strip())
    return super().parse(argument)


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


config_flags.register_flag_parser_for_type(tuple, _TupleParser())


def _one_line(e: BaseException) -> str:
  text = str(e).replace("\\n", "\n").strip()
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  if not lines:
    return type(e).__name__
  line = " ".join(lines[0].split())
  if "Traceback (most recent call last)" in text:
    # config_flags wraps errors of get_config() in a traceback: its last line is the error.
    line = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
  quoted = len(line) > 1 and line[0] == line[-1] and line[0] in "'\""
  return line[1:-1] if quoted else line   # KeyError's message is the repr of the key


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


def _parse(argv: list[str], what: str) -> list[str]:
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)   # override flags of an earlier parse write into its config
  logging.disable(logging.INFO)   # absl logs "unparse_flags() called" at INFO on the root logger
  try:
    flags.FLAGS.unparse_flags()
  finally:
    logging.disable(logging.NOTSET)
  _ARGV[:] = argv
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise ConfigError(_one_line(e)) from None
  except Exception as e:  # errors raised while loading the config file or its get_config
    raise ConfigError(f"{what}: {_one_line(e)}") from None


def parse_flags(argv: list[str], require_config: bool = True) -> None:
  """absl flag parsing with one-line ConfigErrors instead of tracebacks and usage dumps.

  The config is loaded once without the overrides, so that a mistyped field is reported by
  name (with the closest ones), then again with them (config_flags applies and type-checks
  them). Safe to call more than once in a process.
  """
  overrides = [a for a in argv[1:] if _OVERRIDE.match(a)]
  rest = _parse([a for a in argv if not _OVERRIDE.match(a)], "cannot load --config")
  config = flags.FLAGS.config
  if config is None and not require_config:   # the tool takes the run's own config.json
    if overrides:
      raise ConfigError(f"{overrides[0].split('=')[0]} needs --config=FILE")
    if rest[1:]:
      raise ConfigError(f"unexpected argument {rest[1]!r}")
    return
  if config is None:
    raise ConfigError("--config is required, e.g. --config=configs/quickstart.py")
  try:
    config.keys()
  except OSError:  # config_flags defers "file not found" to the first use of the config
    path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    raise ConfigError(f"config file {path!r} not found") from None
  for o in overrides:
    _lookup(config, _OVERRIDE.sub("", o).split("=")[0])
  if overrides:
    rest = _parse(argv, "invalid override")
  if rest[1:]:
    raise ConfigError(f"unexpected argument {rest[1]!r}; flags are --config=FILE[:ARG], "
                      "--workdir=DIR and --config.FIELD=VALUE")


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


def tune_cpu_memory() -> None:
  """On the CPU backend, make glibc keep freed memory (effvit.profile.tune_cpu_allocator):
  XLA:CPU allocates every large buffer afresh each step, and re-faulting them made a pvt_v2_b2
  batch-32 train step 1.7x slower (the quickstart's small buffers: no change).
  EFFVIT_MALLOC=default opts out."""
  import jax
  if os.environ.get("EFFVIT_MALLOC", "tuned") != "default" and jax.default_backend() == "cpu":
    from effvit.profile import tune_cpu_allocator
    tune_cpu_allocator()


def enable_compilation_cache() -> str | None:
  """Keep compiled steps on disk (jax's persistent compilation cache), so that resuming a run,
  re-running a config or evaluating another checkpoint of it loads the train or eval step
  instead of compiling it again. Returns the directory, None when off.

  EFFVIT_COMPILATION_CACHE sets the directory (default ~/.cache/effvit/jax) and "0" turns it
  off; a cache directory given to JAX itself (JAX_COMPILATION_CACHE_DIR) wins. jax keeps only
  compiles that took at least a second and keys each by the program, the compiler options,
  the devices and the jax version, so a change to any of them compiles afresh."""
  import jax
  setting = os.environ.get("EFFVIT_COMPILATION_CACHE", "")
  if setting == "0":
    return None
  if not jax.config.jax_compilation_cache_dir:
    path = setting or os.path.join(os.path.expanduser("~"), ".cache", "effvit", "jax")
    try:   # an unwritable directory would warn at every compile: say it once and compile
      os.makedirs(path, exist_ok=True)
      if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")
    except OSError as e:
      logging.warning("compiled steps are not cached (%s); set EFFVIT_COMPILATION_CACHE to a "
                      "writable directory, or to 0", e)
      return None
    jax.config.update("jax_compilation_cache_dir", path)
  return jax.config.jax_compilation_cache_dir


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is when a record is emitted, so a notebook or test that
  swaps sys.stderr after main() ran (or closes its replacement) does not break logging."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _):
    pass


def setup_logging() -> None:
  # force: importing TensorFlow / TFDS (the config file does) already gave the root logger a
  # WARNING-level handler, which would hide effvit's INFO lines (model, resume, evaluations).
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", handlers=[_StderrHandler()], force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable, argv: list[str] | None = None, require_config: bool = True,
        compilation_cache: bool = True) -> None:
  """Parse flags, call main(config, workdir); exit 2 with one line on a user error.
  With require_config=False a missing --config reaches main as None. compilation_cache=False
  (the profiler, which times compiles) leaves jax's persistent cache off."""
  argv = list(sys.argv if argv is None else argv)
  try:
    parse_flags(argv, require_config)
    setup_logging()
    init_distributed()
    tune_cpu_memory()
    if compilation_cache:
      enable_compilation_cache()
    result = main(flags.FLAGS.config, _WORKDIR.value)
  except EffvitError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(e.exit_code)
  sys.exit(0 if result is None or result is True else result)
