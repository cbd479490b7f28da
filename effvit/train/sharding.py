"""Device mesh and shardings: data parallel by default, optional FSDP-style parameter sharding.

The mesh has two axes, ("data", "fsdp"). The batch is split over both (every device gets a
distinct slice); parameters and optimizer state are replicated over "data" and, when the
"fsdp" axis has more than one device, each array is split along its largest dimension that
the axis divides (arrays too small to split stay replicated).
"""
from __future__ import annotations

import numpy as np
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from effvit.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
MIN_FSDP_SIZE = 2 ** 14   # smaller arrays are cheaper replicated than gathered


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """mesh_cfg: {"data": n | -1, "fsdp": m | -1}; one -1 takes the remaining devices."""
  devices = devices if devices is not None else jax.devices()
  n = len(devices)
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError("at most one mesh axis may be -1 (use the remaining devices)")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or n % known:
    raise ConfigError(f"mesh {dict(zip(AXES, sizes))} does not fit {n} devices: "
                      f"axis sizes must be positive and multiply to {n}")
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ConfigError(f"mesh {dict(zip(AXES, sizes))} uses {int(np.prod(sizes))} devices but "
                      f"{n} are present; set one axis to -1")
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh, abstract_state):
  """A sharding for every leaf of an abstract train state (ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)),
                      abstract_state)


def check_batch_size(global_batch: int, mesh, name: str = "global batch") -> None:
  """`name` is the config field that holds the batch size, for the message."""
  n = mesh.size
  if global_batch <= 0 or global_batch % n:
    valid = ", ".join(str(n * k) for k in (1, 2, 4, 8, 16, 32))
    raise ConfigError(f"{name}={global_batch} is not divisible by the {n} devices; "
                      f"use a multiple of {n} (e.g. {valid})")
  if global_batch % jax.process_count():
    raise ConfigError(f"{name}={global_batch} must be divisible by the "
                      f"{jax.process_count()} processes")


def process_block(sharding: NamedSharding, global_batch: int) -> int:
  """i such that this process's devices hold rows [i·b, (i+1)·b) of a global batch (b: the
  per-process batch): the block of the global batch its input pipeline must load."""
  local = global_batch // jax.process_count()
  rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                 for s in sharding.addressable_devices_indices_map((global_batch,)).values()})
  start = rows[0][0]
  covered = start
  for lo, hi in rows:
    if lo > covered:
      break
    covered = max(covered, hi)
  if covered - start != local or start % local:
    raise ConfigError(f"the mesh gives process {jax.process_index()} rows that are not one "
                      f"block of {local} of the global batch; order the mesh's devices by "
                      "process (jax.make_mesh does)")
  return start // local


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch (this process's block, see process_block) -> global jax.Arrays
  split over the mesh (multi-host safe)."""
  n = jax.process_count()
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (x.shape[0] * n, *x.shape[1:])), local)
