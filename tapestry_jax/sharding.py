"""The site mesh and the ONE table that maps logical axis names to mesh axes.

Model code never names a mesh axis. Every weight and activation carries logical axis
names (`vocab`, `embed`, `mlp`, `heads`, `kv`, `batch`, `length`, ...); `LOGICAL_RULES`
below maps them onto the site's physical mesh axes (`data`, `fsdp`, `tensor`). A mesh
axis of size 1 costs nothing, so the same table serves one CPU and a TPU pod.

The project uses JAX's *Auto* axis types throughout (GSPMD propagation with explicit
in/out shardings and `with_sharding_constraint` hints), see STACK_NOTES.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes it is split over (None = replicated). A mesh axis is
# used at most once per array: later logical axes that ask for an already-used mesh
# axis stay replicated on it (e.g. `embed` of an activation whose `batch` took fsdp).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", "tensor"),
    ("act_vocab", "tensor"),
)
_RULES = dict(LOGICAL_RULES)


class MeshError(ValueError):
  """A mesh configuration that cannot be built on the available devices."""


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
  """Maps a tuple of logical axis names to a PartitionSpec via `LOGICAL_RULES`."""
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    if name not in _RULES:
      raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
    target = _RULES[name]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    free = tuple(t for t in targets if t not in used)
    used.update(free)
    spec.append(free[0] if len(free) == 1 else (free or None))
  return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation inside jit (a no-op outside a mesh context)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Fills in the one `-1` of a {data, fsdp, tensor} shape; checks it covers the devices."""
  dims = [int(shape[a]) for a in MESH_AXES]
  unknown = [a for a, d in zip(MESH_AXES, dims) if d == -1]
  if len(unknown) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, dims))}")
  if any(d == 0 or d < -1 for d in dims):
    raise MeshError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, dims))}")
  known = math.prod(d for d in dims if d != -1)
  if unknown:
    if num_devices % known:
      raise MeshError(
          f"mesh: {dict(zip(MESH_AXES, dims))} cannot fill {num_devices} devices "
          f"({num_devices} is not divisible by {known})")
    dims[MESH_AXES.index(unknown[0])] = num_devices // known
  if math.prod(dims) != num_devices:
    raise MeshError(
        f"mesh: data x fsdp x tensor = {'x'.join(map(str, dims))} = {math.prod(dims)} "
        f"devices, but {num_devices} are available")
  return tuple(dims)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the site mesh (Auto axis types) from a {data, fsdp, tensor} config."""
  devices = list(jax.devices() if devices is None else devices)
  dims = resolve_mesh_shape(shape, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    # Topology-aware device order on real accelerators.
    return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=axis_types)


def batch_axis_size(mesh: Mesh) -> int:
  """How many ways the `batch` logical axis is split on this mesh."""
  spec = logical_to_spec(("batch",))[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)
