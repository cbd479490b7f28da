"""benchmarks/op_profile.py's accounting of a traced step: every instant counted once."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import op_profile  # noqa: E402

MS = 10**9   # trace times are in picoseconds


@pytest.mark.parametrize("runs, expected", [
    ({"a": [[0, 10]], "b": [[10, 30]]}, {"a": 10, "b": 20}),                 # one after another
    ({"a": [[0, 20]], "b": [[10, 30]]}, {"a": 15, "b": 15}),                 # overlap shared
    ({"a": [[0, 30]], "b": [[10, 20]]}, {"a": 25, "b": 5}),                  # nested
    ({"a": [[0, 10]], "b": [[20, 30]]}, {"a": 10, "b": 10, "(idle)": 10}),   # a gap
    ({"a": [[0, 10], [20, 30]], "b": [[5, 25]]}, {"a": 15, "b": 15}),        # a runs twice
])
def test_wall_shares_add_up_to_the_traced_span(runs, expected):
  ps = {op: [[MS * t0, MS * t1] for t0, t1 in rs] for op, rs in runs.items()}
  shares = op_profile.wall_shares(ps)
  assert dict(shares) == pytest.approx(expected)
  assert sum(shares.values()) == pytest.approx(30)


def test_async_convolution_gets_the_time_no_synchronous_op_takes():
  # A convolution dispatched at 0 (1 ms) and completed ("end: conv") at 9-10 ms, while a
  # synchronous fusion ran at 2-4 ms; the fusion runs again at 12-13 ms, and its late `end:`
  # event at 20 ms is not its end.
  events = [(MS * t0, MS * t1, op, end) for t0, t1, op, end in [
      (0, 1, "conv", False), (2, 4, "fusion", False), (9, 10, "conv", True),
      (12, 13, "fusion", False), (20, 21, "fusion", True)]]
  runs = op_profile.op_runs(events, async_ops={"conv"})
  assert runs == {"conv": [[0, 10 * MS]], "fusion": [[2 * MS, 4 * MS], [12 * MS, 13 * MS]]}
  shares = op_profile.wall_shares(runs, background={"conv"})
  assert dict(shares) == pytest.approx({"conv": 8, "fusion": 3, "(idle)": 2})


def test_convolutions_are_found_in_the_hlo():
  hlo = """
  %conv_general_dilated.4 = f32[8,56,56,64]{3,2,1,0} convolution(%p, %k), window={size=3x3}
  %convolution.97 = f32[128,3,3,256]{3,2,1,0} convolution(%a, %b), window={size=28x28}
  ROOT %add_add_fusion.13 = f32[100352,32]{1,0} fusion(%x, %y), kind=kLoop
  """
  assert op_profile.convolutions(hlo) == {"conv_general_dilated.4", "convolution.97"}
