"""The outer (federated) step of DiLoCo as functions of arrays: pseudo-gradients, site
weights, aggregators and the outer optimizers' update rules.

Each site sends an `Update` (its pseudo-gradient and, under shared moments, its first
moment); `merge_block` turns the weighted aggregate into the next global params. The
simulation (`outer_step`, whole arrays) and the coordinator (`merge.merge_round`,
row-blocks) run the same jitted function, so they compute the same bits: the outer state
is per leaf, the transformations elementwise, per-site clipping a scale fixed before the
merge and the robust aggregators coordinate-wise. Settings arrive checked
(`outer_config.RoundMergeSpec`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tapestry_jax import quantize
from tapestry_jax import trees
from tapestry_jax import update_codecs

AGGREGATORS = ("mean", "trimmed_mean", "median")


class Update(NamedTuple):
  """One site's contribution to an outer step: its pseudo-gradient `delta` and, under
  shared moments (`SharedMoments`), its inner Adam first moment `mu`, a tree with the
  same leaves (None otherwise). Either may be a pytree or a flat {name: array} dict."""
  delta: Any
  mu: Any = None


class SharedMoments(NamedTuple):
  """Shared Adam moments, the outer half of a federated AdamW whose moments are global.

  Every site starts its H inner AdamW steps from the global params and Adam state and
  sends its first moment mu_k with its delta_k (`Update`). Per parameter:
    params <- params - lr * sum_k w_k delta_k,   mu <- m = sum_k w_k mu_k,
    g <- (m - b1^H mu) / (1 - b1^H)   (the round's mean gradient),
    nu <- b2^H nu + (1 - b2^H) g^2,   count <- count + H.
  The second moment comes from the merged gradient, not the sites' own squares, so a
  coordinate only one site trains keeps data parallelism's step size (what averaging
  per-site AdamW steps loses on non-IID sites). `init` gives optax's ScaleByAdamState;
  `update` takes the merged `Update` as its "gradient" (`merge_block` passes it).
  """
  lr: float
  b1: float
  b2: float
  steps: int

  def init(self, params):
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                  nu=jax.tree.map(jnp.copy, zeros))

  def decays(self) -> tuple[np.float32, np.float32]:
    """(b1^H, b2^H) in float32: how much of the old moments a round keeps."""
    return np.float32(self.b1 ** self.steps), np.float32(self.b2 ** self.steps)

  def gradient(self, m, mu):
    """The round's mean gradient g from the merged first moment `m` and the old `mu`."""
    c1, _ = self.decays()
    return (m - c1 * mu) / (np.float32(1) - c1)

  def update(self, merged, state, params=None):
    del params
    delta, m = merged
    g = self.gradient(m, state.mu)
    _, c2 = self.decays()
    nu = c2 * state.nu + (np.float32(1) - c2) * (g * g)
    return (jnp.float32(-self.lr) * delta,
            optax.ScaleByAdamState(count=state.count + self.steps, mu=m, nu=nu))


class SharedParams(NamedTuple):
  """A param round of shared moments synced every K rounds (`federation.moment_sync_every`,
  DES-LOC): sites send their pseudo-gradients only and keep training their own moments,
  so params <- params - lr * sum_k w_k delta_k (`SharedMoments`' params rule) and the
  global moments and count stay those of the last moment round. Its state is
  `SharedMoments`' (the same stored leaves), passed through."""
  lr: float

  def init(self, params):
    return SharedMoments(self.lr, 0.0, 0.0, 1).init(params)

  def update(self, delta, state, params=None):
    del params
    return jnp.float32(-self.lr) * delta, state


class Download(NamedTuple):
  """One parameter's part of a global round's download (`federation.download_dtype`):
  the encoded update of its params and, under shared moments, the encoded mean gradient
  of the round (`quantize.BlockCodes` each). The round's global state is DEFINED as the
  previous one plus the decoded download (`download_step`), so a site holding the
  previous round rebuilds it bit for bit from these few bytes."""
  update: Any
  grad: Any = None


def global_moments(outer_state: Mapping[str, Any]) -> tuple[int, dict, dict]:
  """(step count, {name: mu}, {name: nu}) of a `SharedMoments` outer state, given as
  {param name: its state} or {param name: its leaves "count", "mu", "nu"}; ValueError
  if the leaves disagree on the count."""
  leaves = {n: v if isinstance(v, Mapping) else state_leaves(v) for n, v in outer_state.items()}
  counts = {int(np.asarray(v["count"])) for v in leaves.values()}
  if len(counts) != 1:
    raise ValueError(f"the global moments have different step counts {sorted(counts)}")
  return (counts.pop(), {n: v["mu"] for n, v in leaves.items()},
          {n: v["nu"] for n, v in leaves.items()})


def set_adam_state(opt_state, mu, nu, count: Callable[[], Any]):
  """`opt_state` (an optax chain holding one Adam state, e.g. AdamW's) with its moments
  set to the pytrees `mu` and `nu` and every step count (Adam's bias correction, an lr
  schedule's) to a fresh `count()` array each: a train step may donate them."""
  opt_state = optax.tree_utils.tree_set(opt_state, mu=mu, nu=nu)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: count() if getattr(path[-1], "name", None) == "count" else x, opt_state)


def carry_progress(global_, now, sent, decay, nonnegative: bool = False):
  """`decay * global + (now - decay * sent)` leaf by leaf, in float32, cast to the
  global's dtypes: the progress a site made since it sent its update (federation.
  overlap_steps) moved onto the global model that update went into. For params `decay`
  is 1; for an Adam moment it is b^tau, which makes the result the moment tau steps from
  the global one with the site's own gradients (`now - b^tau sent` is exactly what those
  steps added). `nonnegative` floors the result at 0 (the second moment, against
  rounding)."""
  d = jnp.asarray(decay, jnp.float32)

  def leaf(g, n, s):
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    x = d * f32(g) + (f32(n) - d * f32(s))
    return (jnp.maximum(x, 0.0) if nonnegative else x).astype(jnp.asarray(g).dtype)
  return jax.tree.map(leaf, global_, now, sent)


class MaskedDecay(NamedTuple):
  """The outer AdamW when weight decay skips some leaves: `init`/`update` decay, and
  `no_decay` (the same AdamW and state, without decay) is what `leaf_optimizer` picks for
  leaves whose name contains a part of `exclude` (the outer step runs leaf by leaf)."""
  init: Callable
  update: Callable
  no_decay: optax.GradientTransformation
  exclude: tuple[str, ...]


def leaf_optimizer(tx, name: str):
  """The transformation that updates leaf `name` (its flat name, e.g. "layers/wq")."""
  if isinstance(tx, MaskedDecay) and any(part in name for part in tx.exclude):
    return tx.no_decay
  return tx


class ScheduledTraceState(NamedTuple):
  """`scheduled_trace`'s state: the outer steps taken and the momentum buffer."""
  count: jax.Array  # int32 scalar
  trace: Any


def scheduled_trace(momentum: Callable[[jax.Array], jax.Array],
                    nesterov: bool) -> optax.GradientTransformation:
  """`optax.trace` (heavy-ball or Nesterov momentum) whose decay is `momentum(count)`, a
  schedule of the outer steps taken (the outer momentum's warmup and decay). Elementwise,
  and its only state besides the per-parameter trace is a scalar count, so a parameter
  merged block by block gets the same bits as merged whole."""
  def init(params):
    return ScheduledTraceState(count=jnp.zeros([], jnp.int32),
                               trace=optax.tree.zeros_like(params))

  def update(updates, state, params=None):
    del params
    decay = jnp.asarray(momentum(state.count), jnp.float32)
    updates, trace = optax.trace(decay, nesterov=nesterov).update(
        updates, optax.TraceState(trace=state.trace))
    return updates, ScheduledTraceState(count=optax.safe_increment(state.count),
                                        trace=trace.trace)

  return optax.GradientTransformation(init, update)


def min_updates(aggregator: str, trim: int) -> int:
  """The fewest updates `aggregator` can merge: 2 * trim + 1 for trimmed_mean, else 1."""
  return 2 * int(trim) + 1 if aggregator == "trimmed_mean" else 1


def check_update_count(aggregator: str, trim: int, num_updates: int) -> None:
  """Raises ValueError if a round's `num_updates` merged updates are too few for
  `aggregator` (trimmed_mean drops `trim` at each end and needs one left)."""
  if num_updates < 1:
    raise ValueError("the outer step needs at least one site update")
  need = min_updates(aggregator, trim)
  if num_updates < need:
    raise ValueError(f"aggregator {aggregator} with trim={trim} needs at least {need} "
                     f"updates (2 * trim + 1); the round has {num_updates}.")


# ---------------------------------------------------------------------- per-leaf state


def init_outer_state(tx: optax.GradientTransformation, params) -> dict[str, optax.OptState]:
  """One optimizer state per parameter leaf, `{name: tx.init(param)}`, named by
  `trees.flatten` (as the exchange names them)."""
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
  """Rebuilds one parameter's optimizer state from `state_leaves` output. `param_like`
  may be a row-block of the parameter (its leaves then the same rows); shapes and dtypes
  are checked, so a mis-sliced leaf fails here, not as silently different numbers."""
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
  """The outer gradient `global - local` (old minus new) in float32, leaf by leaf: as a
  gradient, a descent step moves the global toward the sites."""
  return jax.tree.map(lambda g, l: jnp.asarray(g, jnp.float32) - jnp.asarray(l, jnp.float32),
                      global_params, local_params)


def cap_weights(tokens: Sequence[int], cap: int | None) -> np.ndarray:
  """Normalized float32 site weights, w_i proportional to min(tokens_i, cap): a site's
  self-reported count cannot buy it more say than the cap. Raises ValueError for
  negative or non-finite counts, a non-positive cap, or when every count is zero."""
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


# Elements per float64 slice when summing squares: bounds the temporary copy to 8 MiB.
def sum_squares(x) -> float:
  """sum(x ** 2) of one array in float64, in slices (so a big leaf needs no float64 copy
  of itself): `update_codecs.dense_sum_squares`, the one place this sum is taken."""
  return update_codecs.dense_sum_squares(x)


def update_norm(delta) -> float:
  """The global L2 norm of one site's pseudo-gradient (a pytree or flat dict) in float64,
  leaves summed in name order: what a site declares (`extra["update_norm"]`) and the
  coordinator clips with and checks."""
  flat = trees.flatten(delta)
  return math.sqrt(sum(_leaf_sum_squares(flat[n]) for n in sorted(flat)))


def _leaf_sum_squares(x) -> float:
  # Coded leaves: the norm of what the merge decodes.
  return update_codecs.sum_squares(update_codecs.to_host(x))


def clip_scales(norms: Sequence[float], clip_norm: float) -> np.ndarray:
  """Per-site float32 clip scales min(1, clip_norm / norm_k) (all 1 when clip_norm is 0);
  ValueError for a negative or non-finite norm when clipping is on."""
  if not clip_norm:
    return np.ones(len(norms), np.float32)
  c = float(clip_norm)
  n = np.asarray(norms, np.float64).reshape(-1)
  if not np.all(np.isfinite(n)) or np.any(n < 0):
    raise ValueError(f"update norms must be finite and >= 0 to clip; got {list(norms)}")
  return (c / np.maximum(n, c)).astype(np.float32)  # Exactly 1 where n <= c.


# ---------------------------------------------------------------------- the merge


def _aggregate(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2):
  """The merged pseudo-gradient of one block, in float32 (traced inside the jits below).
  `quantized[k]`: how site k's block is coded (`_block_args`)."""
  def value(k):  # Site k's delta in float32 (codes: offset + scale * code, or decoded).
    d = deltas[k]
    if quantized[k] == _AFFINE:
      return quantize.dequantize(d, dequant_Kx2[k, 0], dequant_Kx2[k, 1])
    if quantized[k] is not None:  # Block-scaled or top-k codes, as {role: array}.
      return update_codecs.decode(quantized[k], d)
    return d.astype(jnp.float32)

  # mean: delta = sum_k coef_k * delta_k, coef = weight * clip scale. Fixed accumulation
  # order (site 0, 1, ...) in float32: float addition is not associative, so a different
  # order on another block or another run would change the bits.
  if aggregator == "mean":
    delta = coef_K[0] * value(0)
    for k in range(1, len(deltas)):
      delta = delta + coef_K[k] * value(k)
    return delta
  # Robust: coordinate-wise over the clipped deltas (coef = clip scale). Sorting along the
  # site axis is exact and per coordinate, so row-blocks agree with the whole array.
  sorted_KxN = jnp.sort(jnp.stack([coef_K[k] * value(k) for k in range(len(deltas))]),
                        axis=0)
  K = len(deltas)
  if aggregator == "median":
    mid = K // 2
    return sorted_KxN[mid] if K % 2 else 0.5 * (sorted_KxN[mid - 1] + sorted_KxN[mid])
  if aggregator != "trimmed_mean":
    raise ValueError(f"unknown aggregator {aggregator!r}; one of {', '.join(AGGREGATORS)}")
  delta = sorted_KxN[trim]  # trimmed_mean, summed in sorted order like the mean.
  for k in range(trim + 1, K - trim):
    delta = delta + sorted_KxN[k]
  return delta / jnp.float32(K - 2 * trim)


def _all_finite(*trees) -> jax.Array:
  """Whether every floating value in `trees` is finite (a traced bool)."""
  flags = [jnp.isfinite(x).all() for t in trees for x in jax.tree.leaves(t)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _merge_block_jit(tx, aggregator, trim, quantized, quantized_m, with_finite, download,
                     global_block, state_block, deltas, moments, coef_K, dequant_Kx2, dequant_m):
  """merge_block's jitted body; `moments` None (no first moments) or the sites' blocks,
  in which case `tx.update` gets the merged `Update`. With a `download` format, the
  exact new global is followed by the round's encoded `Download`."""
  merged = _aggregate(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2)
  if moments is not None:
    merged = Update(merged, _aggregate(aggregator, trim, quantized_m, moments, coef_K, dequant_m))
  updates, new_state = tx.update(merged, state_block, global_block)
  new_global = optax.apply_updates(global_block, updates)
  out = (new_global, new_state)
  if download is not None:
    grad = (download.encode(tx.gradient(merged.mu, state_block.mu))
            if isinstance(tx, SharedMoments) else None)
    out += (Download(download.encode(updates), grad),)
  if with_finite:
    out += (_all_finite(merged, new_global, new_state),)
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _download_jit(fmt, tx, params, update, mu, nu, grad):
  new = (params.astype(jnp.float32) + fmt.decode(*update, params.shape)).astype(params.dtype)
  if tx is None:
    return new, None, None, _all_finite(new)
  c1, c2 = tx.decays()
  g = fmt.decode(*grad, params.shape)
  mu = c1 * mu + (np.float32(1) - c1) * g
  nu = c2 * nu + (np.float32(1) - c2) * (g * g)
  return new, mu, nu, _all_finite(new, mu, nu)


def download_step(fmt: quantize.BlockFormat, tx, params, down: Download, state=None):
  """(params, state, finite) of the next global round of one parameter (a whole leaf or
  a block of it, on any devices) from this round's `params` and the next round's `down`:
  params + decode(update); under shared moments (`tx` a `SharedMoments`, `state` this
  round's `ScaleByAdamState`) also mu <- b1^H mu + (1 - b1^H) g, nu <- b2^H nu +
  (1 - b2^H) g^2 and count + H, with g = decode(grad) (else `state` is returned as
  given). `finite`: whether every new value is finite (a jax bool).

  The one jitted function the coordinator's merge, the simulation and the sites apply a
  download with, so all of them compute the same bits (one program: XLA cannot fuse the
  multiply-adds differently in one of them)."""
  if not isinstance(tx, SharedMoments):
    new, _, _, finite = _download_jit(fmt, None, params, tuple(down.update), None, None, None)
    return new, state, finite
  if down.grad is None or state is None:
    raise ValueError("a shared-moments download needs the round's gradient and the moments")
  new, mu, nu, finite = _download_jit(fmt, tx, params, tuple(down.update), state.mu, state.nu,
                                      tuple(down.grad))
  return new, optax.ScaleByAdamState(count=state.count + tx.steps, mu=mu, nu=nu), finite


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _aggregate_jit(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2):
  return _aggregate(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2)


_AFFINE = "affine"  # A `quantize.Quantized` block: codes, their offset and scale traced.


def _block_args(deltas: Sequence[Any], weights, scales, aggregator: str, trim: int, shape):
  """(per site: how it is coded, static; its arrays; float32 coefficients, the
  dequantization table of per-tensor codes) of one block's site deltas, checked. A
  site's coding is None (a float array), `_AFFINE` (per-tensor codes) or the `key()` of
  block-scaled or top-k codes, whose arrays go as {role: array}."""
  for k, d in enumerate(deltas):
    if tuple(update_codecs.shape_of(d)) != shape:
      raise ValueError(f"delta {k} has shape {tuple(update_codecs.shape_of(d))}, the block "
                       f"has {shape}")
  quantized = tuple(_AFFINE if isinstance(d, quantize.Quantized)
                    else d.key() if isinstance(d, update_codecs.CODED) else None for d in deltas)
  dequant_Kx2 = np.array([(d.offset, d.scale) if q == _AFFINE else (0, 1)
                          for d, q in zip(deltas, quantized)], np.float32).reshape(-1, 2)
  deltas = tuple(d.codes if q == _AFFINE else d.parts() if q is not None else d
                 for d, q in zip(deltas, quantized))
  weights_K = np.asarray(weights, np.float32).reshape(-1)
  if not deltas:
    raise ValueError("merge_block needs at least one site delta")
  if len(deltas) != weights_K.size:
    raise ValueError(f"got {len(deltas)} deltas but {weights_K.size} weights")
  scales_K = (np.ones_like(weights_K) if scales is None
              else np.asarray(scales, np.float32).reshape(-1))
  if scales_K.size != weights_K.size:
    raise ValueError(f"got {len(deltas)} deltas but {scales_K.size} clip scales")
  check_update_count(aggregator, trim, len(deltas))
  # float32 products on the host: a scale of 1 leaves each weight's bits as they were.
  coef_K = weights_K * scales_K if aggregator == "mean" else scales_K
  return quantized, deltas, coef_K, dequant_Kx2


def aggregate_block(deltas: Sequence[Any], weights, *, scales=None, aggregator: str = "mean",
                    trim: int = 0) -> jax.Array:
  """The merged pseudo-gradient of one block (float32), what `merge_block` feeds the
  outer optimizer: the outer clip needs its norm first."""
  if not deltas:
    raise ValueError("aggregate_block needs at least one site delta")
  shape = update_codecs.shape_of(deltas[0])
  quantized, deltas, coef_K, dequant_Kx2 = _block_args(deltas, weights, scales, aggregator,
                                                       trim, shape)
  return _aggregate_jit(aggregator, int(trim) if aggregator == "trimmed_mean" else 0,
                        quantized, deltas, coef_K, dequant_Kx2)


def merged_clip_scale(norm: float, clip_norm: float) -> np.float32:
  """min(1, clip_norm / norm) in float32: the outer clip's factor for a merged
  pseudo-gradient of global norm `norm` (1 when clip_norm is 0). It multiplies every
  site's coefficient (the mean is linear, and a positive factor commutes with sorting).
  Rounded to float32 so that the simulation's and the coordinator's float64 sums (in
  different orders) give the same factor."""
  if not clip_norm:
    return np.float32(1.0)
  if not (math.isfinite(norm) and norm >= 0):
    raise ValueError(f"the merged pseudo-gradient's norm is {norm!r}; cannot clip it")
  return np.float32(clip_norm / max(norm, clip_norm))


def merge_block(tx: optax.GradientTransformation, global_block, state_block,
                deltas: Sequence[Any], weights, *, scales=None, aggregator: str = "mean",
                trim: int = 0, moments: Sequence[Any] | None = None,
                with_finite: bool = False,
                download: quantize.BlockFormat | None = None) -> tuple[Any, ...]:
  """One outer step on one block (a whole leaf, or rows of it): returns (new_global, new_state).

  The merged pseudo-gradient (float32, fixed order) is the mean sum_k weights[k] *
  scales[k] * deltas[k] (not renormalized after clipping), or per coordinate the trimmed
  mean (`trim` dropped at each end) or the median of scales[k] * deltas[k], which ignore
  `weights`. `scales` are the per-site clip scales (default all 1); a delta may be a
  `quantize.Quantized`, `update_codecs.BlockCoded` or `update_codecs.TopK` block (rows
  of a leaf), decoded inside the jit. Then `tx.update` and `optax.apply_updates`, jitted
  once per `tx` object, aggregator, trim and block shape; for an elementwise `tx`, merging
  row-blocks is bit-identical to merging the whole array.

  `moments` (required exactly for `SharedMoments`): the sites' first-moment blocks,
  aggregated like `deltas`; `tx.update` then gets the merged `Update`.

  `with_finite`: also return, third, whether the merged values, the new global block and
  the new state are all finite (a jax bool from the same jitted call). With the mean, a
  NaN or Inf in any site's block propagates into the merged values, so the flag covers
  the inputs too; it also catches finite values whose merge overflows float32.

  `download` (`federation.download_dtype` on): returns (new_global, new_state, down, ...)
  where `down` is the round's encoded `Download` of the block and new_global (under
  shared moments, new_state's moments too) is the canonical global: this block plus the
  decoded download (`download_step`); other optimizers keep their exact state."""
  shape = tuple(np.shape(global_block))
  trim_ = int(trim) if aggregator == "trimmed_mean" else 0
  quantized, deltas, coef_K, dequant_Kx2 = _block_args(
      deltas, weights, scales, aggregator, trim, shape)
  if isinstance(tx, SharedMoments) != (moments is not None):
    raise ValueError("merge_block needs the sites' first moments (`moments`) exactly when "
                     "the outer optimizer is shared moments")
  quantized_m, dequant_m = None, None
  if moments is not None:
    if len(moments) != len(deltas):
      raise ValueError(f"got {len(deltas)} deltas but {len(moments)} first moments")
    quantized_m, moments, _, dequant_m = _block_args(moments, weights, scales, aggregator,
                                                     trim, shape)
  out = _merge_block_jit(tx, aggregator, trim_, quantized, quantized_m, bool(with_finite),
                         download, global_block, state_block, deltas, moments, coef_K,
                         dequant_Kx2, dequant_m)
  if download is None:
    return out
  _, new_state, down, *finite = out
  new_global, state, ok = download_step(download, tx, global_block, down, state_block)
  if isinstance(tx, SharedMoments):
    new_state = state
  if with_finite:
    return new_global, new_state, down, jnp.logical_and(finite[0], ok)
  return new_global, new_state, down


def outer_step(tx: optax.GradientTransformation, global_params, outer_state: Mapping[str, Any],
               updates: Sequence[Any], weights, *, clip_norm: float = 0.0,
               aggregator: str = "mean", trim: int = 0,
               norms: Sequence[float] | None = None,
               outer_clip_norm: float = 0.0,
               download: quantize.BlockFormat | None = None) -> tuple[Any, ...]:
  """The whole-tree outer step: `merge_block` on every leaf.

  `updates` are the sites' `Update`s (a bare pseudo-gradient is one without `mu`); their
  deltas share `global_params`' structure, and `mu` is given exactly when `tx` is
  `SharedMoments`. `outer_state` is the per-leaf dict of `init_outer_state`. The settings
  come checked (`RoundMergeSpec.outer_step` passes them; the defaults are the plain
  weighted mean). With `clip_norm` > 0 site k is scaled by min(1, clip_norm / norms[k]),
  `norms` defaulting to each delta's `update_norm`; with `outer_clip_norm` > 0 the merged
  pseudo-gradient is scaled by `merged_clip_scale` of its global norm. Returns (new params,
  new per-leaf state) and, with a `download` format, third the round's {name: `Download`}
  (the new params, and under shared moments the moments, are then the canonical ones,
  `merge_block`). Leaf by leaf is what the streaming coordinator computes, so simulation
  and deployment agree bit for bit."""
  updates = [u if isinstance(u, Update) else Update(u) for u in updates]
  check_update_count(aggregator, trim, len(updates))
  moments = isinstance(tx, SharedMoments)
  if any((u.mu is not None) != moments for u in updates):
    raise ValueError("outer_step needs every site's first moment (Update.mu) exactly when "
                     "the outer optimizer is shared moments")
  flat_g = trees.flatten(global_params)
  flat_d = [trees.flatten(u.delta) for u in updates]
  flat_m = [trees.flatten(u.mu) for u in updates] if moments else None
  named = [("outer state", outer_state), *((f"site delta {k}", d) for k, d in enumerate(flat_d)),
           *((f"site {k}'s first moment", m) for k, m in enumerate(flat_m or []))]
  for what, leaves in named:
    if set(leaves) != set(flat_g):
      raise KeyError(f"{what} does not have the params' leaves: "
                     f"{sorted(set(leaves) ^ set(flat_g))[:5]} differ")
  if clip_norm and norms is None:
    norms = [update_norm(d) for d in flat_d]
  if norms is not None and len(norms) != len(flat_d):
    raise ValueError(f"got {len(flat_d)} site deltas but {len(norms)} norms")
  scales = clip_scales(norms, clip_norm) if clip_norm else None  # None: no clipping.
  if outer_clip_norm:
    squares = sum(sum_squares(aggregate_block([d[name] for d in flat_d], weights,
                                              scales=scales, aggregator=aggregator, trim=trim))
                  for name in sorted(flat_g))
    factor = merged_clip_scale(math.sqrt(squares), outer_clip_norm)
    scales = (np.ones(len(flat_d), np.float32) if scales is None else scales) * factor
  new_params, new_state, downs = {}, {}, {}
  for name, g in flat_g.items():
    # With the finiteness flag, unused here, so that this is the coordinator's program:
    # XLA:CPU contracts products and sums into FMAs as it fuses, and the flag changes the
    # fusion (with decoded 4-bit or top-k codes, the last bit of the merge).
    new_params[name], new_state[name], *rest = merge_block(
        leaf_optimizer(tx, name), g, outer_state[name], [d[name] for d in flat_d], weights,
        scales=scales, aggregator=aggregator, trim=trim,
        moments=None if flat_m is None else [m[name] for m in flat_m], with_finite=True,
        download=download)
    if download is not None:
      downs[name] = rest[0]
  if download is not None:
    return trees.unflatten(new_params, global_params), new_state, downs
  return trees.unflatten(new_params, global_params), new_state
