"""The outer step's settings: config defaults, their checks, and the `RoundMergeSpec`.

Data flow: a federation (or `diloco.run_diloco`) config's outer and robust sections are
checked once, here, into a `RoundMergeSpec`; the coordinator, the simulation, the audit
and `run_diloco` merge rounds with it, and the math (`tapestry_jax.outer`) takes its
already-checked values. An audit rebuilds the spec from the sections a global round's
manifest records, through the same `RoundMergeSpec.from_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tapestry_jax import outer as outer_lib
from tapestry_jax import quantize

OUTER_OPTIMIZERS = ("nesterov", "sgd", "adam", "none", "moments")


def default_outer_config() -> ml_collections.ConfigDict:
  """The paper's outer optimizer (SGD with Nesterov momentum 0.9, lr 0.7), every field commented."""
  return ml_collections.ConfigDict(dict(
      # One of OUTER_OPTIMIZERS. nesterov: SGD with Nesterov momentum (DiLoCo). sgd: SGD with
      # optional heavy-ball momentum (lr 1, momentum 0 is FedAvg). adam: Adam on the
      # pseudo-gradient. none: the new global is the weighted mean of the site models.
      # moments: shared Adam moments (`outer.SharedMoments`): every site starts its H inner
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
      # nesterov and sgd: rounds over which the momentum rises linearly from
      # momentum_start (in round 1) to momentum (from round momentum_warmup_rounds + 1 on),
      # Pier's momentum warmup; 0 = off (the momentum is `momentum` from round 1).
      momentum_warmup_rounds=0,
      # The momentum of round 1 under momentum_warmup_rounds, in [0, 1).
      momentum_start=0.0,
      # nesterov and sgd: the last rounds of the run over which the momentum falls
      # linearly from momentum to momentum_end (reached in the last round, total_rounds),
      # Pier's momentum decay; 0 = off. At most total_rounds - momentum_warmup_rounds.
      momentum_decay_rounds=0,
      # The momentum of the last round under momentum_decay_rounds, in [0, 1).
      momentum_end=0.0,
      # The run's length in rounds (outer steps), where momentum_decay_rounds ends; in a
      # federation config 0 = federation.rounds (see federation.outer_config).
      total_rounds=0,
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


def momentum_schedule(cfg) -> Callable[[Any], jax.Array] | None:
  """The nesterov / sgd momentum as a float32 function of the outer steps taken (0 in
  round 1), or None when it is constant (momentum_warmup_rounds and momentum_decay_rounds
  0). Warmup: momentum_start + (momentum - momentum_start) * t / warmup for t < warmup.
  Decay: momentum + (momentum_end - momentum) * (t - begin + 1) / decay from t = begin =
  total_rounds - decay on, so the last round (t = total_rounds - 1) has momentum_end.
  Raises ValueError naming the bad field."""
  momentum = _get(cfg, "momentum")
  momentum = _number("momentum", 0.0 if momentum is None else momentum, 0.0, 1.0,
                     lo_open=False, hi_open=True)
  warmup = _count(cfg, "momentum_warmup_rounds", 0)
  decay = _count(cfg, "momentum_decay_rounds", 0)
  if not (warmup or decay):
    return None
  start = _number("momentum_start", _get(cfg, "momentum_start"), 0.0, 1.0, lo_open=False,
                  hi_open=True)
  end = _number("momentum_end", _get(cfg, "momentum_end"), 0.0, 1.0, lo_open=False,
                hi_open=True)
  total = _count(cfg, "total_rounds", 0)
  if decay and warmup + decay > total:
    raise ValueError(f"outer.momentum_warmup_rounds={warmup} + momentum_decay_rounds={decay} "
                     f"must be at most outer.total_rounds={total} (the run's rounds; in a "
                     f"federation config 0 = federation.rounds).")
  begin = total - decay

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    m = jnp.full_like(t, momentum)
    if warmup:
      m = jnp.where(t < warmup, start + (momentum - start) * (t / warmup), m)
    if decay:
      m = jnp.where(t >= begin, momentum + (end - momentum) * ((t - begin + 1) / decay), m)
    return m
  return schedule


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
  if name not in ("nesterov", "sgd"):
    for key in ("momentum_warmup_rounds", "momentum_decay_rounds"):
      if _count(cfg, key, 0):
        raise ValueError(f"outer.{key} is a nesterov and sgd setting; set it to 0 for {name}.")
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
    schedule = momentum_schedule(cfg)
    if schedule is not None:  # optax.sgd's chain, its trace's decay following the schedule.
      return optax.chain(outer_lib.scheduled_trace(schedule, nesterov=name == "nesterov"),
                         optax.scale_by_learning_rate(lr))
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
    return outer_lib.MaskedDecay(decay.init, decay.update,
                                 optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=0.0),
                                 exclude)
  return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def _shared_moments(cfg) -> outer_lib.SharedMoments:
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
  return outer_lib.SharedMoments(
      lr=_number("lr", lr, 0.0, math.inf, lo_open=True, hi_open=True),
      b1=_number("b1", _get(cfg, "b1"), 0.0, 1.0, lo_open=False, hi_open=True),
      b2=_number("b2", _get(cfg, "b2"), 0.0, 1.0, lo_open=False, hi_open=True),
      steps=int(steps))


def outer_clip(cfg) -> float:
  """`cfg.clip_norm` (0 when absent, e.g. in a manifest written before the field
  existed), checked: a finite number >= 0 (`RoundMergeSpec.outer_clip_norm`)."""
  value = _get(cfg, "clip_norm") if cfg is not None else 0.0
  return _number("clip_norm", 0.0 if value is None else value, 0.0, math.inf, lo_open=False,
                 hi_open=True)


def default_robust_config() -> ml_collections.ConfigDict:
  """Norm clipping and the aggregator of the outer step; the defaults are today's plain
  weighted mean with no clipping. Every field commented."""
  return ml_collections.ConfigDict(dict(
      # Per-site clip of the pseudo-gradient's global L2 norm (over all leaves), > 0 to
      # clip, 0 = off: site k's delta is scaled by min(1, clip_norm / ||delta_k||_2), so a
      # norm-boosted update moves the global by at most clip_norm times its weight.
      # Same units as the parameters.
      clip_norm=0.0,
      # One of outer.AGGREGATORS. mean: the token-weighted mean (outer.cap_weights) of the (clipped)
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
  if aggregator not in outer_lib.AGGREGATORS:
    raise ValueError(f"robust.aggregator must be one of {', '.join(outer_lib.AGGREGATORS)}; "
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
  fields: `default_robust_config()`), checked field by field: the robust fields of a
  `RoundMergeSpec` (and `outer.outer_step`'s keywords). Raises ValueError naming the bad field."""
  clip_norm, aggregator, trim = _check_robust(*(_robust_field(cfg, k)
                                                for k in ("clip_norm", "aggregator", "trim")))
  return {"clip_norm": clip_norm, "aggregator": aggregator, "trim": trim}


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



def check_moment_sync_every(value) -> int:
  """`federation.moment_sync_every` (K) checked: an integer >= 1; ValueError otherwise."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"moment_sync_every must be an integer >= 1 (1 = sync the shared "
                     f"moments every round); got {value!r}")
  return int(value)


def syncs_moments(round_: int, every: int) -> bool:
  """Whether global round `round_` is a moment round under a sync period of `every`
  rounds: round_ % every == 0 (round 0, the initial moments, is one). A pure function
  of the round, so the coordinator, the sites and the audit agree."""
  return int(round_) % int(every) == 0


@dataclasses.dataclass(frozen=True)
class RoundMergeSpec:
  """What a round merge needs besides its inputs, checked once when it is built.

  `merge.merge_round(spec, ...)` (the coordinator, the audit) and `spec.outer_step(...)`
  (the simulation, `diloco.run_diloco`) read their settings from one of these, so no
  caller assembles them by hand. Build it with `from_config` (or directly, e.g. in
  tests); a bad value raises ValueError naming the field."""
  tx: optax.GradientTransformation  # The outer optimizer (`make_outer_optimizer`).
  weight_cap: int | None = None  # Token cap on a site's weight (`outer.cap_weights`); None: no cap.
  clip_norm: float = 0.0  # robust.clip_norm: per-site clip of the update's norm, 0 = off.
  aggregator: str = "mean"  # robust.aggregator, one of outer.AGGREGATORS.
  trim: int = 1  # robust.trim: sites dropped at each end per coordinate by trimmed_mean.
  outer_clip_norm: float = 0.0  # outer.clip_norm: clip of the merged update's norm, 0 = off.
  # federation.download_dtype / download_block: the round's encoded download (the new
  # global is the old one plus its decoded update, `outer.download_step`); None = off.
  download: quantize.BlockFormat | None = None
  # federation.moment_sync_every (K, shared moments only): the global moments are synced
  # in rounds r % K == 0 only; `for_round` gives each round's own spec. 1 = every round.
  moment_sync_every: int = 1

  def __post_init__(self):
    clip_norm, aggregator, trim = _check_robust(self.clip_norm, self.aggregator, self.trim)
    outer_clip_norm = outer_clip({"clip_norm": self.outer_clip_norm})
    cap = self.weight_cap
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float, np.number))
                            or not (math.isfinite(float(cap)) and cap > 0)):
      raise ValueError(f"weight cap must be > 0 (or None for no cap); got {cap!r}")
    if self.shared_moments and outer_clip_norm:
      raise ValueError("the outer clip is not supported with shared moments (outer.name moments)")
    if self.download is not None and not isinstance(self.download, quantize.BlockFormat):
      raise ValueError(f"download must be a quantize.BlockFormat or None; got {self.download!r}")
    every = check_moment_sync_every(self.moment_sync_every)
    if every > 1 and not self.shared_moments:
      raise ValueError(f"moment_sync_every={every} syncs shared Adam moments every {every} "
                       f"rounds; it needs outer.name moments (or 1)")
    for key, value in (("clip_norm", clip_norm), ("aggregator", aggregator), ("trim", trim),
                       ("outer_clip_norm", outer_clip_norm), ("moment_sync_every", every)):
      object.__setattr__(self, key, value)

  @classmethod
  def from_config(cls, outer, robust=None, *, weight_cap: int | None = None,
                  download: Mapping | None = None,
                  moment_sync_every: int = 1) -> "RoundMergeSpec":
    """The spec of an outer section (`default_outer_config()` fields), a robust section
    (`default_robust_config()` fields; None or absent fields: its defaults), a token
    weight cap (None: no cap), a download format ({"dtype", "block"}, what a global
    manifest records; None: off) and the moment sync period K. Raises ValueError naming
    the bad field."""
    fmt = None
    if download is not None:
      if not isinstance(download, Mapping) or set(download) != {"dtype", "block"}:
        raise ValueError(f"download must be {{'dtype': ..., 'block': ...}}; got {download!r}")
      fmt = quantize.BlockFormat(download["dtype"], download["block"])
    return cls(make_outer_optimizer(outer), weight_cap=weight_cap,
               outer_clip_norm=outer_clip(outer), download=fmt,
               moment_sync_every=moment_sync_every, **robust_kwargs(robust))

  def moment_round(self, round_: int) -> bool:
    """Whether global round `round_` syncs the shared moments (`syncs_moments`); True
    for every round without shared moments synced on a period."""
    return syncs_moments(round_, self.moment_sync_every)

  def for_round(self, round_: int) -> "RoundMergeSpec":
    """The spec that merges global round `round_` >= 1: this one, except under shared
    moments synced every K > 1 rounds, where a moment round advances the moments over
    the K * H inner steps since the last one (`outer.SharedMoments` with steps K * H) and
    a param round updates the params only (`outer.SharedParams`)."""
    every = self.moment_sync_every
    if every == 1:
      return self
    tx = self.tx
    if self.moment_round(round_):
      tx = tx._replace(steps=tx.steps * every)
    else:
      tx = outer_lib.SharedParams(tx.lr)
    return dataclasses.replace(self, tx=tx, moment_sync_every=1)

  @property
  def shared_moments(self) -> bool:
    """Whether updates carry the sites' first moments (`outer.SharedMoments`)."""
    return isinstance(self.tx, outer_lib.SharedMoments)

  def weights(self, tokens: Sequence[int]) -> np.ndarray:
    """The sites' float32 merge weights from their token counts, capped at `weight_cap`."""
    return outer_lib.cap_weights(tokens, self.weight_cap)

  def outer_step(self, global_params, outer_state: Mapping[str, Any],
                 updates: Sequence[Any], weights, *,
                 norms: Sequence[float] | None = None) -> tuple[Any, dict[str, Any]]:
    """`outer.outer_step` with this spec's optimizer and settings: the whole-array merge
    that `merge.merge_round(spec, ...)` computes block by block. With `download`, also
    returns the round's {name: `outer.Download`}, third."""
    return outer_lib.outer_step(self.tx, global_params, outer_state, updates, weights,
                                clip_norm=self.clip_norm, aggregator=self.aggregator,
                                trim=self.trim, norms=norms,
                                outer_clip_norm=self.outer_clip_norm, download=self.download)
