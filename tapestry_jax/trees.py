"""Flat, named views of parameter pytrees.

The exchange stores one array per leaf, named by its path ("layers/attn/wq"); the outer
optimizer keeps one state per leaf. Both go through these two functions so that a name
means the same leaf everywhere.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten(tree) -> dict[str, Any]:
  """Leaves of `tree` keyed by their '/'-joined path, in the pytree's leaf order."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(_key_name(k) for k in path)
    if name in flat:
      raise ValueError(f"two leaves share the name {name!r}")
    flat[name] = leaf
  return flat


def unflatten(flat: Mapping[str, Any], like) -> Any:
  """Rebuilds the structure of `like` from a dict produced by `flatten(like)`."""
  names = list(flatten(like))
  missing = [n for n in names if n not in flat]
  extra = sorted(set(flat) - set(names))
  if missing or extra:
    raise KeyError(f"leaf names do not match: missing {missing[:5]}, unexpected {extra[:5]}")
  treedef = jax.tree_util.tree_structure(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
