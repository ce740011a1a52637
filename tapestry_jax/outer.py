"""The outer (federated) step of DiLoCo: pseudo-gradients, site weights, outer optimizer.

Data flow: each site trains H inner steps from the global params, then sends
`pseudo_gradient(global, local)` (old minus new). The coordinator weights the sites
(`cap_weights`), and `merge_block` turns the weighted sum into the next global params with
an optax outer optimizer. The in-process simulation (`diloco.run_diloco`, via
`outer_step`) and the streaming coordinator (which calls `merge_block` on row-blocks of one
parameter at a time) run the same jitted function, so they compute the same bits.

Why per-leaf and elementwise: the outer optimizer state is kept per parameter leaf
(`{name: tx.init(param)}`), and only elementwise transformations are allowed (SGD,
Nesterov momentum, Adam, plain averaging: no global-norm clipping, no cross-leaf
statistics). That is what makes a chunk-by-chunk merge exact: updating rows [a:b] of a
parameter needs only rows [a:b] of the deltas and of the state's parameter-shaped leaves,
plus the state's small scalars (e.g. Adam's step count), which every block updates the same way.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tapestry_jax import trees

OUTER_OPTIMIZERS = ("nesterov", "sgd", "adam", "none")


def default_outer_config() -> ml_collections.ConfigDict:
  """The paper's outer optimizer (SGD with Nesterov momentum 0.9, lr 0.7), every field commented."""
  return ml_collections.ConfigDict(dict(
      # One of OUTER_OPTIMIZERS. nesterov: SGD with Nesterov momentum (DiLoCo). sgd: SGD with
      # optional heavy-ball momentum (lr 1, momentum 0 is FedAvg). adam: Adam on the
      # pseudo-gradient. none: the new global is the weighted mean of the site models.
      name="nesterov",
      # Outer learning rate (multiplies the weighted pseudo-gradient); unused by "none".
      # The paper uses 0.7 for nesterov; FedAvg is sgd with lr 1.0.
      lr=0.7,
      # Momentum decay for nesterov and sgd, in [0, 1); 0 with sgd means no momentum.
      momentum=0.9,
      # Adam first-moment decay, in [0, 1).
      b1=0.9,
      # Adam second-moment decay, in [0, 1).
      b2=0.999,
      # Adam epsilon, > 0. The paper finds outer Adam unstable unless eps is about 0.1.
      eps=0.1,
  ))


def _get(cfg, key: str):
  """`cfg[key]`, or the default when the field is absent (an explicit value is kept as is)."""
  if not isinstance(cfg, (Mapping, ml_collections.ConfigDict)):
    raise ValueError("the outer optimizer config must be a ConfigDict or Mapping; "
                     f"got {type(cfg).__name__}.")
  return cfg[key] if key in cfg else default_outer_config()[key]


def _number(key: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
  """`value` as a float in the given interval, or one clear ValueError."""
  lo_s = "(" if lo_open else "["
  hi_s = ")" if hi_open else "]"
  interval = f"{lo_s}{lo}, {'inf' if math.isinf(hi) else hi}{hi_s}"
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"outer.{key} must be a number in {interval}; got {value!r}.") from None
  ok = (math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi))
  if not ok:
    raise ValueError(f"outer.{key} must be a number in {interval}; got {value!r}.")
  return x


def make_outer_optimizer(cfg) -> optax.GradientTransformation:
  """The outer optimizer named by `cfg.name`, fed with the weighted pseudo-gradient as gradient.

  `cfg` is a ConfigDict or Mapping with fields name, lr, momentum, b1, b2, eps (missing
  fields take `default_outer_config()` values). Only elementwise transformations are built,
  which is what lets the coordinator merge a parameter block by block exactly. `lr` may
  also be an optax schedule (a callable of the outer step); its count is a scalar state
  leaf, so block-wise merging stays exact.

  Raises ValueError with one sentence naming the bad field and the valid choices.
  """
  name = _get(cfg, "name")
  if name not in OUTER_OPTIMIZERS:
    raise ValueError(f"outer.name must be one of {', '.join(OUTER_OPTIMIZERS)}; got {name!r}.")
  if name == "none":
    # new = global - sum_k w_k (global - local_k) = sum_k w_k local_k when the weights sum to 1.
    return optax.scale(-1.0)
  lr = _get(cfg, "lr")
  if not callable(lr):
    lr = _number("lr", lr, 0.0, math.inf, lo_open=True, hi_open=True)
  if name in ("nesterov", "sgd"):
    momentum = _get(cfg, "momentum")
    momentum = 0.0 if momentum is None else momentum  # None reads as "no momentum"
    momentum = _number("momentum", momentum, 0.0, 1.0, lo_open=False, hi_open=True)
    if name == "nesterov":
      return optax.sgd(lr, momentum=momentum, nesterov=True)
    return optax.sgd(lr, momentum=momentum or None)
  b1 = _number("b1", _get(cfg, "b1"), 0.0, 1.0, lo_open=False, hi_open=True)
  b2 = _number("b2", _get(cfg, "b2"), 0.0, 1.0, lo_open=False, hi_open=True)
  eps = _number("eps", _get(cfg, "eps"), 0.0, math.inf, lo_open=True, hi_open=True)
  return optax.adam(lr, b1=b1, b2=b2, eps=eps)


# ---------------------------------------------------------------------- per-leaf state


def init_outer_state(tx: optax.GradientTransformation, params) -> dict[str, optax.OptState]:
  """One optimizer state per parameter leaf: `{name: tx.init(param)}`.

  `params` is a flat `{name: array}` dict or any pytree (flattened with `trees.flatten`,
  so names match the exchange's)."""
  return {name: tx.init(p) for name, p in trees.flatten(params).items()}


def state_leaves(state) -> dict[str, jax.Array]:
  """One parameter's optimizer state as named arrays, named by the state's own key path.

  E.g. adam -> {"0/count": int32[], "0/mu": like param, "0/nu": like param};
  nesterov -> {"0/trace": like param}; none -> {}."""
  return trees.flatten(state)


def state_template(tx: optax.GradientTransformation, param_like) -> Any:
  """The abstract (ShapeDtypeStruct) state `tx.init` gives for a parameter like `param_like`."""
  spec = jax.ShapeDtypeStruct(np.shape(param_like), param_like.dtype)
  return jax.eval_shape(tx.init, spec)


def blockable_leaves(tx: optax.GradientTransformation, param_like) -> dict[str, bool]:
  """For each state leaf name: True if it has the parameter's shape (slice it like the param),
  False if it must be read whole (scalars such as Adam's count)."""
  shape = tuple(np.shape(param_like))
  return {n: tuple(s.shape) == shape
          for n, s in trees.flatten(state_template(tx, param_like)).items()}


def state_from_leaves(tx: optax.GradientTransformation, param_like, leaves: Mapping[str, Any]):
  """Rebuilds one parameter's optimizer state from `state_leaves` output.

  `param_like` (array or ShapeDtypeStruct) may be a row-block of the parameter: the
  parameter-shaped leaves must then be the same rows. Shapes and dtypes are checked so a
  mis-sliced or mis-typed leaf fails here, not as silently different numbers."""
  template = state_template(tx, param_like)
  flat_t = trees.flatten(template)
  out = {}
  for name, spec in flat_t.items():
    if name not in leaves:
      raise KeyError(f"outer state leaf {name!r} is missing (have {sorted(leaves)})")
    x = leaves[name]
    if tuple(np.shape(x)) != tuple(spec.shape) or np.dtype(x.dtype) != np.dtype(spec.dtype):
      raise ValueError(f"outer state leaf {name!r} is {np.dtype(x.dtype)}{list(np.shape(x))}, "
                       f"expected {np.dtype(spec.dtype)}{list(spec.shape)}")
    out[name] = jnp.asarray(x)
  return trees.unflatten(out, template)


# ---------------------------------------------------------------------- weights, deltas


def pseudo_gradient(global_params, local_params):
  """The outer gradient `global - local` (old minus new) in float32, leaf by leaf.

  Feeding it as a gradient to a descent optimizer moves the global toward the sites."""
  return jax.tree.map(lambda g, l: jnp.asarray(g, jnp.float32) - jnp.asarray(l, jnp.float32),
                      global_params, local_params)


def cap_weights(tokens: Sequence[int], cap: int | None) -> np.ndarray:
  """Normalized float32 site weights, w_i proportional to min(tokens_i, cap).

  The cap is set by the coordinator: a site that reports more tokens than the cap gets
  no more weight than a site at the cap, so self-reported counts cannot inflate a site's
  say. Raises ValueError for negative or non-finite counts, a non-positive cap, or when
  every count is zero."""
  t = np.asarray(tokens, np.float64).reshape(-1)
  if t.size == 0:
    raise ValueError("cap_weights got no sites")
  if not np.all(np.isfinite(t)) or np.any(t < 0):
    raise ValueError(f"token counts must be finite and >= 0; got {list(tokens)}")
  if cap is not None:
    if not (math.isfinite(float(cap)) and cap > 0):
      raise ValueError(f"weight cap must be > 0 (or None for no cap); got {cap!r}")
    t = np.minimum(t, float(cap))
  total = t.sum()
  if total <= 0:
    raise ValueError("every site reported zero tokens; the merge weights are undefined")
  return (t / total).astype(np.float32)


# ---------------------------------------------------------------------- the merge


@functools.partial(jax.jit, static_argnums=0)
def _merge_block_jit(tx, global_block, state_block, deltas, weights_K):
  # Fixed accumulation order (site 0, 1, ...) in float32: float addition is not associative,
  # so a different order on another block or another run would change the bits.
  delta = weights_K[0] * deltas[0].astype(jnp.float32)
  for k in range(1, len(deltas)):
    delta = delta + weights_K[k] * deltas[k].astype(jnp.float32)
  updates, new_state = tx.update(delta, state_block, global_block)
  return optax.apply_updates(global_block, updates), new_state


def merge_block(tx: optax.GradientTransformation, global_block, state_block,
                deltas: Sequence[Any], weights) -> tuple[jax.Array, Any]:
  """One outer step on one block (a whole leaf, or rows of it): returns (new_global, new_state).

  delta = sum_k weights[k] * deltas[k] (float32, fixed order), then
  `tx.update(delta, state_block, global_block)` and `optax.apply_updates`. Jitted once per
  `tx` object (it is a static argument) and per block shape. For an elementwise `tx` (all of
  `make_outer_optimizer`'s), merging row-blocks and concatenating them is bit-identical to
  merging the whole array; scalar state leaves come out equal from every block."""
  deltas = tuple(deltas)
  weights_K = np.asarray(weights, np.float32).reshape(-1)
  if not deltas:
    raise ValueError("merge_block needs at least one site delta")
  if len(deltas) != weights_K.size:
    raise ValueError(f"got {len(deltas)} deltas but {weights_K.size} weights")
  shape = tuple(np.shape(global_block))
  for k, d in enumerate(deltas):
    if tuple(np.shape(d)) != shape:
      raise ValueError(f"delta {k} has shape {tuple(np.shape(d))}, the block has {shape}")
  return _merge_block_jit(tx, global_block, state_block, deltas, weights_K)


def outer_step(tx: optax.GradientTransformation, global_params, outer_state: Mapping[str, Any],
               site_deltas: Sequence[Any], weights) -> tuple[Any, dict[str, Any]]:
  """The whole-tree outer step: `merge_block` on every leaf.

  `global_params` and each of `site_deltas` share one pytree structure; `outer_state` is
  the per-leaf dict from `init_outer_state`. Returns (new_params with `global_params`'
  structure, new per-leaf state dict). Leaf by leaf is deliberate: it is exactly what the
  streaming coordinator computes, so simulation and deployment agree bit for bit."""
  flat_g = trees.flatten(global_params)
  flat_d = [trees.flatten(d) for d in site_deltas]
  if set(outer_state) != set(flat_g):
    missing = sorted(set(flat_g) - set(outer_state))[:5]
    extra = sorted(set(outer_state) - set(flat_g))[:5]
    raise KeyError(f"outer state does not match the params: missing {missing}, unexpected {extra}")
  for k, d in enumerate(flat_d):
    if set(d) != set(flat_g):
      raise KeyError(f"site delta {k} does not have the params' leaves: "
                     f"{sorted(set(d) ^ set(flat_g))[:5]} differ")
  new_params, new_state = {}, {}
  for name, g in flat_g.items():
    new_params[name], new_state[name] = merge_block(
        tx, g, outer_state[name], [d[name] for d in flat_d], weights)
  return trees.unflatten(new_params, global_params), new_state
