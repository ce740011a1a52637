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

Robust merging (`default_robust_config`): each site's pseudo-gradient may be clipped to a
global L2 norm, and the weighted mean may be replaced by a coordinate-wise trimmed mean or
median. Both stay block-exact: clipping is a per-site scale min(1, C / ||delta_k||) fixed
before the merge (the streaming coordinator takes ||delta_k|| from the site's signed
manifest, then checks it against the values it reads), and the robust aggregators are
coordinate-wise.

The outer clip (`default_outer_config().clip_norm`, `outer_clip`) bounds the global norm of
the merged pseudo-gradient: one more scalar factor on every site's coefficient
(`merged_clip_scale`), known only once every block has been aggregated, so the streaming
coordinator computes it in a first pass over the updates (`aggregate_block`). Outer AdamW
decay is chosen per leaf name (`leaf_optimizer`), so it can spare norm scales.

Shared moments (`SharedMoments`, outer name "moments") is a federated AdamW whose Adam
state is global: sites start every round from it and send their first moment with their
pseudo-gradient (`MOMENT_PREFIX`), and the outer step merges both (`merge_block(...,
moments=)`). It keeps per-coordinate step sizes of data parallelism on non-IID sites,
which averaging per-site AdamW steps (FedAvg, DiLoCo) does not.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tapestry_jax import quantize
from tapestry_jax import trees

OUTER_OPTIMIZERS = ("nesterov", "sgd", "adam", "none", "moments")
# Under outer "moments", a site's update carries its inner Adam first moment of parameter
# `name` as the array MOMENT_PREFIX + name, next to the pseudo-gradient `name`.
MOMENT_PREFIX = "inner_mu/"
AGGREGATORS = ("mean", "trimmed_mean", "median")


def default_outer_config() -> ml_collections.ConfigDict:
  """The paper's outer optimizer (SGD with Nesterov momentum 0.9, lr 0.7), every field commented."""
  return ml_collections.ConfigDict(dict(
      # One of OUTER_OPTIMIZERS. nesterov: SGD with Nesterov momentum (DiLoCo). sgd: SGD with
      # optional heavy-ball momentum (lr 1, momentum 0 is FedAvg). adam: Adam on the
      # pseudo-gradient. none: the new global is the weighted mean of the site models.
      # moments: shared Adam moments (`SharedMoments`): every site starts its H inner
      # AdamW steps from the global Adam moments and step count, and sends its first
      # moment with its pseudo-gradient; the coordinator applies the weighted mean
      # pseudo-gradient (times lr), averages the first moments and advances the second
      # moment with the round's mean gradient recovered from them. A federation config
      # sets b1, b2 and steps_per_round from train and inner_steps (outer_config).
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
      # Adam epsilon, > 0. The paper finds outer Adam unstable unless eps is about 0.1
      # (with inner AdamW); with inner SGD (FedAdam) a small eps such as 1e-8 works.
      eps=0.1,
      # adam only: decoupled weight decay (AdamW) applied by the outer step; 0 = none.
      weight_decay=0.0,
      # Comma-separated substrings of leaf names ("layers/attn_norm") that weight decay
      # skips; the default spares norm scales, like train's AdamW. "" decays every leaf.
      weight_decay_exclude="norm",
      # Schedule of the outer lr over outer steps (rounds): constant (after warmup) or
      # cosine (after warmup, down to min_lr_ratio x lr at decay_rounds).
      schedule="constant",
      # Rounds of linear warmup of the outer lr from 0; 0 = none.
      warmup_rounds=0,
      # cosine only: the outer step at which the lr reaches min_lr_ratio x lr; in a
      # federation config 0 = federation.rounds (see federation.outer_config).
      decay_rounds=0,
      # cosine only: the final outer lr as a fraction of lr.
      min_lr_ratio=0.1,
      # Clip of the merged pseudo-gradient's global L2 norm (all leaves) before the outer
      # optimizer, > 0 to clip, 0 = off: the outer counterpart of train.grad_clip. With
      # H=1, inner SGD lr 1 and no site clip, the merged pseudo-gradient is the mean
      # gradient, so this is data parallelism's clip exactly (`+fedadam` uses it). It
      # needs the norm of the merge before any of it is applied: the coordinator reads
      # the updates twice (`merge.merge_round`).
      clip_norm=0.0,
      # moments only: the inner steps each round's moments advance by (H); in a
      # federation config 0 = federation.inner_steps (see federation.outer_config).
      steps_per_round=0,
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


def _count(cfg, key: str, lo: int) -> int:
  value = _get(cfg, key)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f"outer.{key} must be an integer >= {lo}; got {value!r}.")
  return int(value)


def _outer_schedule(cfg, lr: float):
  """`lr` itself (constant, no warmup), or an optax schedule of the outer step count."""
  schedule = _get(cfg, "schedule")
  if schedule not in ("constant", "cosine"):
    raise ValueError(f"outer.schedule must be constant or cosine; got {schedule!r}.")
  warmup = _count(cfg, "warmup_rounds", 0)
  if schedule == "cosine":
    decay = _count(cfg, "decay_rounds", 1)
    if decay <= warmup:
      raise ValueError(f"outer.decay_rounds={decay} must be greater than outer.warmup_rounds="
                       f"{warmup} for the cosine schedule.")
    end = lr * _number("min_lr_ratio", _get(cfg, "min_lr_ratio"), 0.0, 1.0, lo_open=False,
                       hi_open=False)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay, end)
  if warmup == 0:
    return lr
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                               optax.constant_schedule(lr)], [warmup])


def make_outer_optimizer(cfg) -> optax.GradientTransformation:
  """The outer optimizer named by `cfg.name`, fed with the weighted pseudo-gradient as gradient.

  `cfg` is a ConfigDict or Mapping with the fields of `default_outer_config()` (missing
  fields take its values). Only elementwise transformations are built, which is what lets
  the coordinator merge a parameter block by block exactly. The lr follows `schedule`
  over outer steps (or `lr` may itself be an optax schedule, a callable of the outer
  step); a schedule's count is a scalar state leaf, so block-wise merging stays exact.

  Raises ValueError with one sentence naming the bad field and the valid choices.
  """
  outer_clip(cfg)  # A bad clip_norm is a config error here, where the rest are.
  name = _get(cfg, "name")
  if name not in OUTER_OPTIMIZERS:
    raise ValueError(f"outer.name must be one of {', '.join(OUTER_OPTIMIZERS)}; got {name!r}.")
  if name == "none":
    # new = global - sum_k w_k (global - local_k) = sum_k w_k local_k when the weights sum to 1.
    return optax.scale(-1.0)
  if name == "moments":
    return _shared_moments(cfg)
  lr = _get(cfg, "lr")
  if not callable(lr):
    lr = _outer_schedule(cfg, _number("lr", lr, 0.0, math.inf, lo_open=True, hi_open=True))
  if name in ("nesterov", "sgd"):
    if _get(cfg, "weight_decay"):
      raise ValueError(f"outer.weight_decay is an Adam (AdamW) setting; set it to 0 for "
                       f"{name}, or use adam.")
    momentum = _get(cfg, "momentum")
    momentum = 0.0 if momentum is None else momentum  # None reads as "no momentum"
    momentum = _number("momentum", momentum, 0.0, 1.0, lo_open=False, hi_open=True)
    if name == "nesterov":
      return optax.sgd(lr, momentum=momentum, nesterov=True)
    return optax.sgd(lr, momentum=momentum or None)
  b1 = _number("b1", _get(cfg, "b1"), 0.0, 1.0, lo_open=False, hi_open=True)
  b2 = _number("b2", _get(cfg, "b2"), 0.0, 1.0, lo_open=False, hi_open=True)
  eps = _number("eps", _get(cfg, "eps"), 0.0, math.inf, lo_open=True, hi_open=True)
  wd = _number("weight_decay", _get(cfg, "weight_decay"), 0.0, math.inf, lo_open=False,
               hi_open=True)
  if wd:
    exclude = _get(cfg, "weight_decay_exclude")
    if not isinstance(exclude, str):
      raise ValueError(f"outer.weight_decay_exclude must be a string of comma-separated "
                       f"leaf-name parts; got {exclude!r}.")
    exclude = tuple(p.strip() for p in exclude.split(",") if p.strip())
    decay = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    if not exclude:
      return decay
    # weight_decay 0 keeps AdamW's state structure, so every leaf stores the same state.
    return MaskedDecay(decay.init, decay.update,
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0), exclude)
  return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def _shared_moments(cfg) -> "SharedMoments":
  lr = _get(cfg, "lr")
  if callable(lr) or _get(cfg, "schedule") != "constant" or _get(cfg, "warmup_rounds"):
    raise ValueError("outer.name moments takes a constant outer.lr (schedule constant, no "
                     "warmup_rounds): the sites' AdamW schedule already sets the step sizes.")
  for key in ("weight_decay", "clip_norm"):
    if _get(cfg, key):
      raise ValueError(f"outer.{key} is not supported with outer.name moments (the sites' "
                       f"AdamW decays and clips); set it to 0.")
  steps = _get(cfg, "steps_per_round")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"outer.steps_per_round must be an integer >= 1 (the inner steps per "
                     f"round) with outer.name moments; got {steps!r}.")
  return SharedMoments(
      lr=_number("lr", lr, 0.0, math.inf, lo_open=True, hi_open=True),
      b1=_number("b1", _get(cfg, "b1"), 0.0, 1.0, lo_open=False, hi_open=True),
      b2=_number("b2", _get(cfg, "b2"), 0.0, 1.0, lo_open=False, hi_open=True),
      steps=int(steps))


class SharedMoments(NamedTuple):
  """Shared Adam moments, the outer half of a federated AdamW whose moments are global.

  Every site starts its H inner AdamW steps from the global params AND the global Adam
  state (first moment mu, second moment nu, step count), and sends, with its
  pseudo-gradient delta_k, its first moment mu_k after the H steps
  (`MOMENT_PREFIX` + name). The outer step, per parameter:
    params <- params - lr * sum_k w_k delta_k          (lr 1: the sites' mean model)
    mu     <- m = sum_k w_k mu_k                        (linear in the gradients: what one
                                                         AdamW on the mean gradient keeps)
    g      <- (m - b1^H mu) / (1 - b1^H)                (the round's mean gradient, as one
                                                         constant gradient would give m)
    nu     <- b2^H nu + (1 - b2^H) g^2,    count <- count + H.
  The second moment is built from the merged gradient, not from the sites' own squares
  (whose mean would add every site's gradient noise and disagreement to it): a
  coordinate only one site trains then gets data parallelism's step size, not a fraction
  of it, which is what averaging per-site AdamW steps (FedAvg, DiLoCo) loses on non-IID
  sites. At H = 1 the sites' steps differ from data parallelism's only by the site's own
  squared gradient in its one-step second moment (and the clip placement).

  `init` gives optax's ScaleByAdamState (count, mu, nu); `update` takes the pair
  (merged delta, merged mu) as its "gradient" (`merge_block` passes it).
  """
  lr: float
  b1: float
  b2: float
  steps: int

  def init(self, params):
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                  nu=jax.tree.map(jnp.copy, zeros))

  def update(self, merged, state, params=None):
    del params
    delta, m = merged
    c1, c2 = np.float32(self.b1 ** self.steps), np.float32(self.b2 ** self.steps)
    g = (m - c1 * state.mu) / (np.float32(1) - c1)
    nu = c2 * state.nu + (np.float32(1) - c2) * (g * g)
    return (jnp.float32(-self.lr) * delta,
            optax.ScaleByAdamState(count=state.count + self.steps, mu=m, nu=nu))


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


class MaskedDecay(NamedTuple):
  """The outer AdamW when weight decay skips some leaves: an optax transformation (its
  `init` and `update` decay) plus `no_decay`, the same AdamW without decay (the same
  state), which `leaf_optimizer` picks for leaves whose name contains a part of
  `exclude`. The outer step runs one leaf at a time, so the choice is by name."""
  init: Callable
  update: Callable
  no_decay: optax.GradientTransformation
  exclude: tuple[str, ...]


def leaf_optimizer(tx, name: str):
  """The transformation that updates leaf `name` (its flat name, e.g. "layers/wq")."""
  if isinstance(tx, MaskedDecay) and any(part in name for part in tx.exclude):
    return tx.no_decay
  return tx


def outer_clip(cfg) -> float:
  """`cfg.clip_norm` (0 when absent, e.g. in a manifest written before the field
  existed), checked: a finite number >= 0. The merge functions take it as
  `outer_clip_norm`."""
  value = _get(cfg, "clip_norm") if cfg is not None else 0.0
  return _number("clip_norm", 0.0 if value is None else value, 0.0, math.inf, lo_open=False,
                 hi_open=True)


# ---------------------------------------------------------------------- robust merge config


def default_robust_config() -> ml_collections.ConfigDict:
  """Norm clipping and the aggregator of the outer step; the defaults are today's plain
  weighted mean with no clipping. Every field commented."""
  return ml_collections.ConfigDict(dict(
      # Per-site clip of the pseudo-gradient's global L2 norm (over all leaves), > 0 to
      # clip, 0 = off: site k's delta is scaled by min(1, clip_norm / ||delta_k||_2), so a
      # norm-boosted update moves the global by at most clip_norm times its weight.
      # Same units as the parameters.
      clip_norm=0.0,
      # One of AGGREGATORS. mean: the token-weighted mean (cap_weights) of the (clipped)
      # deltas. trimmed_mean: per coordinate, drop the `trim` largest and `trim` smallest
      # site values and average the rest. median: per coordinate median (the mean of the two
      # middle values for an even count). The robust aggregators are unweighted: token
      # weights do not apply to them.
      aggregator="mean",
      # Sites dropped at EACH end per coordinate by trimmed_mean, >= 1 (unused otherwise).
      # A round may close with only `quorum` updates, so quorum must be >= 2 * trim + 1.
      trim=1,
  ))


def _robust_field(cfg, key: str):
  """`cfg[key]`, or the `default_robust_config()` value when the field is absent."""
  if cfg is None:
    return default_robust_config()[key]
  if not isinstance(cfg, (Mapping, ml_collections.ConfigDict)):
    raise ValueError("the robust merge config must be a ConfigDict or Mapping; "
                     f"got {type(cfg).__name__}.")
  return cfg[key] if key in cfg else default_robust_config()[key]


def _check_robust(clip_norm, aggregator, trim) -> tuple[float, str, int]:
  """The three robust settings, checked one by one (not against any site count)."""
  if aggregator not in AGGREGATORS:
    raise ValueError(f"robust.aggregator must be one of {', '.join(AGGREGATORS)}; "
                     f"got {aggregator!r}.")
  bad_clip = ValueError(f"robust.clip_norm must be a finite number >= 0 (0 = off); "
                        f"got {clip_norm!r}.")
  try:
    c = float(clip_norm)
  except (TypeError, ValueError):
    raise bad_clip from None
  if isinstance(clip_norm, bool) or not (math.isfinite(c) and c >= 0):
    raise bad_clip
  if isinstance(trim, bool) or not isinstance(trim, (int, np.integer)) or trim < 0:
    raise ValueError(f"robust.trim must be an integer >= 0; got {trim!r}.")
  if aggregator == "trimmed_mean" and trim < 1:
    raise ValueError(f"robust.trim must be >= 1 for aggregator trimmed_mean (trim 0 is the "
                     f"plain unweighted mean); got {trim}.")
  return c, aggregator, int(trim)


def robust_kwargs(cfg) -> dict[str, Any]:
  """`{"clip_norm", "aggregator", "trim"}` from a robust config section (None or absent
  fields: `default_robust_config()`), checked field by field; the keyword arguments of
  `outer_step` and `merge.merge_round`. Raises ValueError naming the bad field."""
  clip_norm, aggregator, trim = _check_robust(*(_robust_field(cfg, k)
                                                for k in ("clip_norm", "aggregator", "trim")))
  return {"clip_norm": clip_norm, "aggregator": aggregator, "trim": trim}


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


def check_robust_config(cfg, num_sites: int, quorum: int) -> None:
  """Raises ValueError (one line) if the robust settings `cfg` cannot be supported by a
  federation of `num_sites` sites whose rounds may close with `quorum` updates (0 = every
  site, as `federation.quorum`). Refused: an unknown aggregator, a negative or non-finite
  clip_norm, trimmed_mean with trim < 1 or quorum < 2 * trim + 1, and median with quorum < 3
  (the median of two updates is their mean: it tolerates no bad update)."""
  kw = robust_kwargs(cfg)  # clip_norm: any value >= 0 works with any number of sites.
  aggregator, trim = kw["aggregator"], kw["trim"]
  if int(num_sites) < 1:
    raise ValueError(f"the robust merge needs at least one site; got num_sites={num_sites}.")
  if not 0 <= int(quorum) <= int(num_sites):
    raise ValueError(f"quorum must be between 0 (= all) and the number of sites "
                     f"{num_sites}; got {quorum}.")
  k = int(quorum) or int(num_sites)  # The fewest updates a round may be merged from.
  if aggregator == "trimmed_mean" and k < 2 * trim + 1:
    raise ValueError(f"robust.aggregator trimmed_mean with trim={trim} needs a quorum of at "
                     f"least 2 * trim + 1 = {2 * trim + 1} updates; the quorum is {k} "
                     f"({num_sites} sites). Lower robust.trim or raise federation.quorum.")
  if aggregator == "median" and k < 3:
    raise ValueError(f"robust.aggregator median needs a quorum of at least 3 updates (the "
                     f"median of 2 is their mean and tolerates nothing); the quorum is {k} "
                     f"({num_sites} sites).")


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


# Elements per float64 slice when summing squares: bounds the temporary copy to 8 MiB.
_NORM_SLICE = 1 << 20


def sum_squares(x) -> float:
  """sum(x ** 2) of one array in float64, in slices of `_NORM_SLICE` elements (so a big
  leaf needs no float64 copy of itself)."""
  flat = np.asarray(x).reshape(-1)
  total = 0.0
  for i in range(0, flat.size, _NORM_SLICE):
    part = flat[i:i + _NORM_SLICE].astype(np.float64)
    total += float(np.dot(part, part))
  return total


def update_norm(delta) -> float:
  """The global L2 norm of one site's pseudo-gradient over all its leaves, in float64.

  `delta` is a pytree or flat `{name: array}` dict; leaves are summed in name order so the
  number does not depend on the container. A site declares this value in its update's
  manifest (`extra["update_norm"]`); the coordinator clips with it and checks it against the
  norm of the values it reads."""
  flat = trees.flatten(delta)
  return math.sqrt(sum(_leaf_sum_squares(flat[n]) for n in sorted(flat)))


def _leaf_sum_squares(x) -> float:
  if isinstance(x, quantize.Quantized):  # The norm of what the merge dequantizes.
    return quantize.sum_squares(jax.device_get(x.codes), x.offset, x.scale)
  return sum_squares(jax.device_get(x))


def clip_scales(norms: Sequence[float], clip_norm: float) -> np.ndarray:
  """Per-site float32 clip scales min(1, clip_norm / norm_k) (all 1 when clip_norm is 0).

  A zero norm gets scale 1. Raises ValueError for a negative or non-finite norm when
  clipping is on (the coordinator turns a bad declared norm into a BadUpdate first)."""
  c, _, _ = _check_robust(clip_norm, "mean", 0)
  if not c:
    return np.ones(len(norms), np.float32)
  n = np.asarray(norms, np.float64).reshape(-1)
  if not np.all(np.isfinite(n)) or np.any(n < 0):
    raise ValueError(f"update norms must be finite and >= 0 to clip; got {list(norms)}")
  return (c / np.maximum(n, c)).astype(np.float32)  # Exactly 1 where n <= c.


# ---------------------------------------------------------------------- the merge


def _aggregate(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2):
  """The merged pseudo-gradient of one block, in float32 (traced inside the jits below)."""
  def value(k):  # Site k's delta in float32 (codes: offset + scale * code).
    d = deltas[k]
    if quantized[k]:
      return quantize.dequantize(d, dequant_Kx2[k, 0], dequant_Kx2[k, 1])
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
  delta = sorted_KxN[trim]  # trimmed_mean, summed in sorted order like the mean.
  for k in range(trim + 1, K - trim):
    delta = delta + sorted_KxN[k]
  return delta / jnp.float32(K - 2 * trim)


def _all_finite(*trees) -> jax.Array:
  """Whether every floating value in `trees` is finite (a traced bool)."""
  flags = [jnp.isfinite(x).all() for t in trees for x in jax.tree.leaves(t)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _merge_block_jit(tx, aggregator, trim, quantized, quantized_m, with_finite, global_block,
                     state_block, deltas, moments, coef_K, dequant_Kx2, dequant_m):
  """merge_block's jitted body; `moments` None (no first moments) or the sites' blocks,
  in which case `tx.update` gets the pair (merged delta, merged moment)."""
  merged = _aggregate(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2)
  if moments is not None:
    merged = (merged, _aggregate(aggregator, trim, quantized_m, moments, coef_K, dequant_m))
  updates, new_state = tx.update(merged, state_block, global_block)
  new_global = optax.apply_updates(global_block, updates)
  if with_finite:
    return new_global, new_state, _all_finite(merged, new_global, new_state)
  return new_global, new_state


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _aggregate_jit(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2):
  return _aggregate(aggregator, trim, quantized, deltas, coef_K, dequant_Kx2)


def _block_args(deltas: Sequence[Any], weights, scales, aggregator: str, trim: int, shape):
  """(quantized flags, codes or arrays, float32 coefficients, dequantization table) of
  one block's site deltas, checked."""
  quantized = tuple(isinstance(d, quantize.Quantized) for d in deltas)
  dequant_Kx2 = np.array([(d.offset, d.scale) if q else (0, 1)
                          for d, q in zip(deltas, quantized)], np.float32).reshape(-1, 2)
  deltas = tuple(d.codes if q else d for d, q in zip(deltas, quantized))
  weights_K = np.asarray(weights, np.float32).reshape(-1)
  if not deltas:
    raise ValueError("merge_block needs at least one site delta")
  if len(deltas) != weights_K.size:
    raise ValueError(f"got {len(deltas)} deltas but {weights_K.size} weights")
  scales_K = (np.ones_like(weights_K) if scales is None
              else np.asarray(scales, np.float32).reshape(-1))
  if scales_K.size != weights_K.size:
    raise ValueError(f"got {len(deltas)} deltas but {scales_K.size} clip scales")
  _check_robust(0.0, aggregator, trim)
  check_update_count(aggregator, trim, len(deltas))
  for k, d in enumerate(deltas):
    if tuple(np.shape(d)) != shape:
      raise ValueError(f"delta {k} has shape {tuple(np.shape(d))}, the block has {shape}")
  # float32 products on the host: a scale of 1 leaves each weight's bits as they were.
  coef_K = weights_K * scales_K if aggregator == "mean" else scales_K
  return quantized, deltas, coef_K, dequant_Kx2


def aggregate_block(deltas: Sequence[Any], weights, *, scales=None, aggregator: str = "mean",
                    trim: int = 0) -> jax.Array:
  """The merged pseudo-gradient of one block (float32), what `merge_block` feeds the
  outer optimizer: the outer clip (`outer_clip`) needs its norm first."""
  if not deltas:
    raise ValueError("aggregate_block needs at least one site delta")
  shape = tuple(np.shape(getattr(deltas[0], "codes", deltas[0])))
  quantized, deltas, coef_K, dequant_Kx2 = _block_args(deltas, weights, scales, aggregator,
                                                       trim, shape)
  return _aggregate_jit(aggregator, int(trim) if aggregator == "trimmed_mean" else 0,
                        quantized, deltas, coef_K, dequant_Kx2)


def merged_clip_scale(norm: float, clip_norm: float) -> np.float32:
  """min(1, clip_norm / norm) in float32: the outer clip's factor for a merged
  pseudo-gradient of global norm `norm` (1 when clip_norm is 0). It multiplies every
  site's coefficient (the mean is linear, and a positive factor commutes with sorting).

  The simulation and the streaming coordinator sum the same float64 squares in different
  orders (whole leaves against blocks); the factor is rounded to float32, so both get the
  same bits unless the two sums straddle a float32 rounding boundary (their relative
  difference is ~1e-16, float32's spacing ~6e-8)."""
  if not clip_norm:
    return np.float32(1.0)
  if not (math.isfinite(norm) and norm >= 0):
    raise ValueError(f"the merged pseudo-gradient's norm is {norm!r}; cannot clip it")
  return np.float32(clip_norm / max(norm, clip_norm))


def merge_block(tx: optax.GradientTransformation, global_block, state_block,
                deltas: Sequence[Any], weights, *, scales=None, aggregator: str = "mean",
                trim: int = 0, moments: Sequence[Any] | None = None,
                with_finite: bool = False) -> tuple[Any, ...]:
  """One outer step on one block (a whole leaf, or rows of it): returns (new_global, new_state).

  The merged pseudo-gradient, in float32 and a fixed order, is
    mean:          sum_k weights[k] * scales[k] * deltas[k] (no renormalization after
                   clipping, so a clipped site keeps its bound);
    trimmed_mean:  per coordinate, the mean of the values scales[k] * deltas[k] left after
                   dropping the `trim` smallest and `trim` largest;
    median:        per coordinate, the median of scales[k] * deltas[k] (even count: the
                   mean of the two middle values).
  The robust aggregators ignore `weights` (token counts do not apply to them). `scales`
  are the per-site clip scales (`clip_scales`; default all 1: no clipping). A delta may be
  a `quantize.Quantized` block (int8 / float8 codes, dequantized here in float32). Then
  `tx.update(delta, state_block, global_block)` and `optax.apply_updates`. Jitted once per
  `tx` object (a static argument), aggregator, trim and block shape. For an elementwise
  `tx` (all of `make_outer_optimizer`'s), merging row-blocks and concatenating them is
  bit-identical to merging the whole array; scalar state leaves come out equal from every
  block.

  `moments` (outer `SharedMoments` only, which requires them): the sites' first-moment
  blocks in the order of `deltas`, aggregated like them; `tx.update` then gets the pair
  (merged delta, merged moment).

  `with_finite`: also return, third, whether every value of the merged pseudo-gradient
  (and moment), of the new global block and of the new state's floating leaves is
  finite (a jax bool, computed in the same jitted call; the other outputs are the same
  bits either way). With the mean, a NaN or Inf in any site's block makes the merged
  pseudo-gradient non-finite (IEEE NaN and Inf propagate through the weighted sum, also
  with a coefficient of 0), so the flag covers the inputs too; and it catches finite
  values whose merge overflows float32."""
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
  return _merge_block_jit(tx, aggregator, trim_, quantized, quantized_m, bool(with_finite),
                          global_block, state_block, deltas, moments, coef_K, dequant_Kx2,
                          dequant_m)


def outer_step(tx: optax.GradientTransformation, global_params, outer_state: Mapping[str, Any],
               site_deltas: Sequence[Any], weights, *, clip_norm: float = 0.0,
               aggregator: str = "mean", trim: int = 0,
               norms: Sequence[float] | None = None,
               outer_clip_norm: float = 0.0) -> tuple[Any, dict[str, Any]]:
  """The whole-tree outer step: `merge_block` on every leaf.

  `global_params` and each of `site_deltas` share one pytree structure; `outer_state` is
  the per-leaf dict from `init_outer_state`. `clip_norm`, `aggregator` and `trim` are the
  robust settings (`robust_kwargs`; the defaults are the plain weighted mean). With
  `clip_norm` > 0 each site is scaled by min(1, clip_norm / norms[k]); `norms` default to
  `update_norm(site_deltas[k])` (pass the sites' declared norms to reproduce a streaming
  merge that used them). With `outer_clip_norm` > 0 (`outer_clip(cfg)`) the merged
  pseudo-gradient is then scaled by `merged_clip_scale` of its global norm (leaves summed
  in name order, like the coordinator's blocks). Returns (new_params with
  `global_params`' structure, new per-leaf state dict). Leaf by leaf is deliberate: it is exactly what the streaming coordinator
  computes, so simulation and deployment agree bit for bit."""
  clip_norm, aggregator, trim = _check_robust(clip_norm, aggregator, trim)
  check_update_count(aggregator, trim, len(site_deltas))
  flat_g = trees.flatten(global_params)
  flat_d = [trees.flatten(d) for d in site_deltas]
  flat_m = None
  if isinstance(tx, SharedMoments):  # Each update also holds MOMENT_PREFIX + name leaves.
    if outer_clip_norm:
      raise ValueError("the outer clip is not supported with shared moments (outer.name moments)")
    flat_m = [{n[len(MOMENT_PREFIX):]: v for n, v in d.items() if n.startswith(MOMENT_PREFIX)}
              for d in flat_d]
    flat_d = [{n: v for n, v in d.items() if not n.startswith(MOMENT_PREFIX)} for d in flat_d]
    for k, m in enumerate(flat_m):
      if set(m) != set(flat_g):
        raise KeyError(f"site update {k} does not have a first moment ({MOMENT_PREFIX}<name>) "
                       f"of every parameter: {sorted(set(m) ^ set(flat_g))[:5]} differ")
  if set(outer_state) != set(flat_g):
    missing = sorted(set(flat_g) - set(outer_state))[:5]
    extra = sorted(set(outer_state) - set(flat_g))[:5]
    raise KeyError(f"outer state does not match the params: missing {missing}, unexpected {extra}")
  for k, d in enumerate(flat_d):
    if set(d) != set(flat_g):
      raise KeyError(f"site delta {k} does not have the params' leaves: "
                     f"{sorted(set(d) ^ set(flat_g))[:5]} differ")
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
  new_params, new_state = {}, {}
  for name, g in flat_g.items():
    new_params[name], new_state[name] = merge_block(
        leaf_optimizer(tx, name), g, outer_state[name], [d[name] for d in flat_d], weights,
        scales=scales, aggregator=aggregator, trim=trim,
        moments=None if flat_m is None else [m[name] for m in flat_m])
  return trees.unflatten(new_params, global_params), new_state
