"""GMACs (multiply-accumulates, the PVT/Twins papers' "FLOPs") from a trace of the forward pass,
against the references' counts at 224x224 (refs/architectures.md §1.3, §2.4, §3.4: torch's
flop counter on the PyTorch models, attention products included)."""
import jax
import jax.numpy as jnp
import pytest

from effvit.models import create_model
from effvit.profile import count_macs, model_cost
from pyramid_helpers import registered_abstract_variables

REFERENCE_GMACS = {
    "pvt_v1_tiny": 1.93,
    "pvt_v2_b0": 0.57,
    "pvt_v2_b2": 4.03,
    "pvt_v2_b2_li": 3.89,
    "twins_pcpvt_small": 3.81,
    "twins_svt_small": 2.93,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_GMACS))
def test_gmacs_at_224_match_reference(name, native_convs):
  # Both ways of building the convs count the same work.
  cost = model_cost(create_model(name), 224, variables=registered_abstract_variables(name))
  gmacs = cost["gmacs"]
  assert abs(gmacs / REFERENCE_GMACS[name] - 1) < 0.03, gmacs


def test_count_macs_closed_forms():
  # The counter itself, on ops whose MACs are known in closed form.
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  assert count_macs(lambda a, b: a @ b, f32(5, 7), f32(7, 3)) == 5 * 7 * 3
  assert count_macs(lambda q, k: jnp.einsum("bnhd,bmhd->bhnm", q, k),
                    f32(2, 10, 4, 8), f32(2, 6, 4, 8)) == 2 * 4 * 10 * 6 * 8
  conv = lambda x, w, g: jax.lax.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g)
  # out 5x5x12 positions, each (in/g)·k² MACs.
  assert count_macs(lambda x, w: conv(x, w, 1), f32(1, 10, 10, 6), f32(3, 3, 6, 12)) == \
      5 * 5 * 12 * 6 * 9
  assert count_macs(lambda x, w: conv(x, w, 3), f32(1, 10, 10, 6), f32(3, 3, 2, 12)) == \
      5 * 5 * 12 * 2 * 9
