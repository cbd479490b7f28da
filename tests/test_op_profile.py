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


def test_async_op_runs_until_its_completion_event():
  # An Eigen convolution: dispatched at 0 (1 ms), completed by "end: conv" at 9-10 ms, while a
  # synchronous fusion ran at 2-4 ms; the fusion also runs a second time at 12-13 ms.
  events = [(MS * t0, MS * t1, op, end) for t0, t1, op, end in [
      (0, 1, "conv", False), (2, 4, "fusion", False), (9, 10, "conv", True),
      (12, 13, "fusion", False)]]
  runs = op_profile.op_runs(events)
  assert runs == {"conv": [[0, 10 * MS]], "fusion": [[2 * MS, 4 * MS], [12 * MS, 13 * MS]]}
  shares = op_profile.wall_shares(runs)
  assert dict(shares) == pytest.approx({"conv": 9, "fusion": 2, "(idle)": 2})
