"""`python -m effvit.profile`: the printed table (columns, GMACs equal to model_cost), the timm
name mapping, and one-line user errors. Runs in-process on the quickstart model at 32 px."""
import pathlib

import pytest

from effvit import profile_cli
from effvit.models import create_model
from effvit.profile import model_cost

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADINGS = ("res", "params (M)", "GMACs", "compile infer (s)", "compile train (s)",
            "infer img/s", "train img/s", "infer peak (MiB)", "train peak (MiB)")


def run_cli(monkeypatch, capsys, *args):
  monkeypatch.chdir(ROOT)
  monkeypatch.syspath_prepend(str(ROOT))
  with pytest.raises(SystemExit) as exit_info:
    profile_cli.run(["effvit.profile", "--config=configs/quickstart.py", *args])
  out, err = capsys.readouterr()
  return exit_info.value.code, out, err


# Two stages of the quickstart model: the same code paths, half the compiling.
TWO_STAGES = dict(embed_dims=(32, 64), depths=(1, 1), num_heads=(1, 2), mlp_ratios=(4, 4),
                  sr_ratios=(4, 2), mixers=("sra", "sra"), windows=(7, 7), pool_sizes=(7, 7),
                  patch_strides=(2, 2), va_layers=(1, 1))


def test_table_columns_and_gmacs(monkeypatch, capsys):
  overrides = [f"--config.model.{k}={','.join(map(str, v))}," for k, v in TWO_STAGES.items()]
  code, out, err = run_cli(monkeypatch, capsys, "--resolutions=32", "--batch=2", "--reps=1",
                           "--compare-timm", *overrides)
  assert code == 0, err
  lines = out.strip().splitlines()
  # The quickstart shrinks pvt_v2_b0: timm's pvt_v2_b0 is another model, so it is skipped.
  assert any("timm comparison skipped" in l and "embed_dims" in l for l in lines)
  head = next(i for i, l in enumerate(lines) if l.lstrip().startswith("res "))
  headings = [h.strip() for h in lines[head].split("  ") if h.strip()]
  assert tuple(headings) == HEADINGS
  cells = lines[head + 1].split()
  assert len(cells) == len(HEADINGS) and int(cells[0]) == 32
  from configs import quickstart
  cfg = quickstart.get_config()
  cfg.model.update(TWO_STAGES)
  expected = model_cost(create_model(cfg.model_name, **cfg.model), 32)
  assert float(cells[2]) == pytest.approx(expected["gmacs"], rel=1e-3)
  assert float(cells[1]) == pytest.approx(expected["params"] / 1e6, abs=1e-3)
  values = [float(c) for c in cells[3:]]
  assert all(v > 0 for v in values), cells


def test_timm_names():
  assert profile_cli.timm_name("pvt_v2_b2_li") == "pvt_v2_b2_li"
  assert profile_cli.timm_name("twins_svt_small") == "twins_svt_small"
  assert profile_cli.timm_name("resnest50d_4s2x40d") == "resnest50d_4s2x40d"
  assert profile_cli.timm_name("pvt_v1_tiny") is None
  assert profile_cli.timm_name("lavit_small") is None


@pytest.mark.parametrize("args, message", [
    (("--resolutions=32,x",), "--resolutions=32,x: expected integers"),
    (("--dtype=float8",), "unknown dtype 'float8'"),
    (("--batch=0",), "must be positive"),
])
def test_user_errors_are_one_line(monkeypatch, capsys, args, message):
  code, _, err = run_cli(monkeypatch, capsys, *args)
  assert code == 2
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], err
