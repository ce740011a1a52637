"""The coordinator's contribution check (as Covenant's Gauntlet): every site update of a
round is scored by what it alone does to the loss of a small validation set the
coordinator holds, and the round's weights or inputs follow the scores.

  score_k = L(theta) - L(theta - lr * delta_k)

theta: the global params the round starts from; delta_k: site k's pseudo-gradient as sent
(decoded, before any robust clip); L: the mean token cross-entropy (nats) over the fixed
validation batches; lr: `contribution.lr` (1: the site's own trained model). Positive: the
update helps. A score below `threshold` (or one whose loss is not finite) is flagged:
`weight` merges a flagged site with its capped token count times `down_weight`, `refuse`
leaves it out of the round (which still needs its quorum).

theta - lr * delta_k is the round merged from site k alone with outer SGD at lr
(`Scorer.probe_spec`): the simulation takes `outer_step` on whole arrays, the coordinator
the streaming merge (every chunk verified), the same bits. L runs on one device in both,
so sim and deploy score alike. The scores and decisions go into the signed global
manifest (`Checked.record`); the audit checks the weights and refusals against them
(`check_record`), without recomputing the scores (the validation set is the
coordinator's own; its digest is recorded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

import data_pipelines

from tapestry_jax import buckets
from tapestry_jax import exchange
from tapestry_jax import merge as merge_lib
from tapestry_jax import model as model_lib
from tapestry_jax import outer as outer_lib
from tapestry_jax import outer_config
from tapestry_jax import sharding
from tapestry_jax import train as train_lib
from tapestry_jax import trees

MODES = ("off", "weight", "refuse")
# The eval step's trainer needs a train section; nothing of it is used but its shape.
_EVAL_ONLY_TRAIN = dict(microbatches=1, optimizer="sgd", lr=0.0, schedule="constant",
                        warmup_steps=0, steps=1, min_lr_ratio=1.0, grad_clip=0.0)


def default_config() -> ml_collections.ConfigDict:
  """`federation.contribution`, every field commented; off by default."""
  return ml_collections.ConfigDict(dict(
      # One of MODES. off: no check. weight: a site scoring below threshold merges with
      # its capped token count times down_weight. refuse: it is left out of the round.
      mode="off",
      # Scores (nats per token of validation loss gained) below this are flagged.
      threshold=0.0,
      # weight mode: the factor on a flagged site's token count, in (0, 1).
      down_weight=0.1,
      # The step a site's update is applied with when scored, > 0 (1: its own model).
      lr=1.0,
      # The validation set: data.source, data.paths and data.synthetic.languages of the
      # coordinator's own data ("" = the config's data section), the split read, and
      # how many batches of train.global_batch_size rows (one ordered pass, >= 1).
      source="",
      paths="",
      languages="",
      split="eval",
      batches=2,
  ))


@dataclasses.dataclass(frozen=True)
class Policy:
  """What a round does with the scores (checked once when built)."""
  mode: str = "off"
  threshold: float = 0.0
  down_weight: float = 0.1
  lr: float = 1.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"contribution.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
    for key, ok, allowed in (("threshold", lambda x: True, "a finite number"),
                             ("down_weight", lambda x: 0 < x < 1, "a number in (0, 1)"),
                             ("lr", lambda x: x > 0, "a finite number > 0")):
      value = getattr(self, key)
      number = not isinstance(value, bool) and isinstance(value, (int, float, np.number))
      x = float(value) if number else math.nan
      if not (math.isfinite(x) and ok(x)):
        raise ValueError(f"contribution.{key} must be {allowed}; got {value!r}")
      object.__setattr__(self, key, x)

  @classmethod
  def from_config(cls, cfg) -> "Policy":
    """The policy of a `federation.contribution` section (None: off; absent fields:
    `default_config()`)."""
    if cfg is None:
      return cls()
    if not isinstance(cfg, (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f"contribution must be a ConfigDict or Mapping; got {type(cfg).__name__}")
    d = default_config()
    return cls(**{k: cfg[k] if k in cfg else d[k]
                  for k in ("mode", "threshold", "down_weight", "lr")})

  @property
  def on(self) -> bool:
    return self.mode != "off"

  def flagged(self, score: float | None) -> bool:
    """Whether a score (None: its loss was not finite) is below the threshold."""
    return score is None or score < self.threshold

  def refuses(self, score: float | None) -> bool:
    return self.mode == "refuse" and self.flagged(score)

  def weights(self, tokens: Sequence[int], cap: int | None,
              scores: Sequence[float | None]) -> np.ndarray:
    """The merge weights of the kept sites: `outer.cap_weights` of their capped token
    counts, a flagged site's times down_weight in weight mode (with nothing flagged,
    bit for bit `cap_weights(tokens, cap)`)."""
    t = np.asarray(tokens, np.float64).reshape(-1)
    if cap is not None:
      t = np.minimum(t, float(cap))
    factors = np.asarray([self.down_weight if self.mode == "weight" and self.flagged(s) else 1.0
                          for s in scores], np.float64)
    return outer_lib.cap_weights(t * factors, None)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def policy(config) -> Policy:
  """`federation.contribution` of a federation config as a `Policy` (off when absent)."""
  return Policy.from_config(config.federation.get("contribution"))


def check_config(config) -> None:
  """ValueError naming the field for a bad `federation.contribution`: its policy, weight
  mode with a robust aggregator (unweighted), and (when on) its validation data."""
  p = policy(config)
  if not p.on:
    return
  robust = config.federation.get("robust")
  aggregator = outer_config.robust_kwargs(robust)["aggregator"]
  if p.mode == "weight" and aggregator != "mean":
    raise ValueError(f"contribution.mode weight sets merge weights, which robust.aggregator "
                     f"{aggregator} does not use; use mode refuse or aggregator mean")
  batches = config.federation.contribution.get("batches", default_config().batches)
  if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
    raise ValueError(f"contribution.batches must be an integer >= 1; got {batches!r}")
  try:
    data_pipelines.validate(validation_data_config(config))
  except data_pipelines.DataError as e:
    raise ValueError(f"contribution: the validation data: {e}") from None


def validation_data_config(config) -> ml_collections.ConfigDict:
  """The coordinator's validation data: the config's data section with
  `federation.contribution`'s source, paths and languages."""
  c = config.federation.contribution
  d = ml_collections.ConfigDict(config.data.to_dict())
  if c.get("source", ""):
    d.source = c.source
  if c.get("paths", ""):
    d.paths = c.paths
  if c.get("languages", ""):
    d.synthetic.languages = c.languages
  return d


def validation_batches(config) -> list[dict[str, np.ndarray]]:
  """The fixed validation batches: the first `contribution.batches` of one ordered pass
  over the split, the same in every process."""
  c = config.federation.contribution
  ds = data_pipelines.make_dataset(validation_data_config(config), split=c.get("split", "eval"),
                                   batch_size=int(config.train.global_batch_size), shard=(0, 1))
  n = int(c.get("batches", default_config().batches))
  return [{k: np.asarray(v) for k, v in b.items()} for b in itertools.islice(iter(ds), n)]


def batches_digest(batches: Sequence[Mapping[str, np.ndarray]]) -> str:
  """sha256 over the batches' arrays (key order): which validation set scored a round."""
  h = hashlib.sha256()
  for b in batches:
    for k in sorted(b):
      a = np.ascontiguousarray(b[k])
      h.update(f"{k}:{a.dtype}:{a.shape}\n".encode())
      h.update(a.tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class Checked:
  """One round's contribution check: the global loss, each scored site's probe loss and
  score (None: not finite), and which sites the policy refuses."""
  policy: Policy
  validation_sha256: str
  global_loss: float | None
  sites: list[str]
  digests: list[str]  # each scored update's manifest digest ("" in a simulation)
  losses: list[float | None]
  scores: list[float | None]
  # Updates the merge would refuse (site -> why), found while scoring; not scored.
  bad: dict[str, str] = dataclasses.field(default_factory=dict)

  def score(self, site: str) -> float | None:
    return self.scores[self.sites.index(site)]

  @property
  def refused(self) -> list[str]:
    return [n for n, s in zip(self.sites, self.scores) if self.policy.refuses(s)]

  def weights(self, names: Sequence[str], tokens: Sequence[int], cap: int | None) -> np.ndarray:
    """The merge weights of sites `names` (kept, in merge order)."""
    return self.policy.weights(tokens, cap, [self.score(n) for n in names])

  def record(self) -> dict:
    """What the signed global manifest records (`extra["contribution"]`)."""
    return {"policy": self.policy.to_dict(), "validation_sha256": self.validation_sha256,
            "global_loss": self.global_loss,
            "sites": [{"site": n, "manifest_sha256": d, "loss": l, "score": s,
                       "refused": self.policy.refuses(s)}
                      for n, d, l, s in zip(self.sites, self.digests, self.losses, self.scores)]}


def _finite(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


class Scorer:
  """Scores site updates on the validation set, on one device (see the module docstring)."""

  def __init__(self, config, device: jax.Device | None = None):
    check_config(config)
    self.policy = policy(config)
    mcfg = model_lib.ModelConfig.from_config(config.model)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                              [device or jax.local_devices()[0]])
    self.trainer = train_lib.Trainer(mcfg, ml_collections.ConfigDict(_EVAL_ONLY_TRAIN), mesh)
    self.batches = validation_batches(config)
    self.validation_sha256 = batches_digest(self.batches)
    # theta - lr * delta: one site's round merged alone with outer SGD at lr, no state.
    self.probe_spec = outer_config.RoundMergeSpec(
        outer_config.make_outer_optimizer({"name": "sgd", "lr": self.policy.lr,
                                           "momentum": 0.0}))
    self._scratch = buckets.Bucket(f"memory://contribution-{uuid.uuid4().hex}")

  def loss(self, flat_params: Mapping[str, Any]) -> float | None:
    """The mean validation cross-entropy of flat params (None: not finite)."""
    params = jax.device_put(trees.unflatten(dict(flat_params), self.trainer.param_shardings),
                            self.trainer.param_shardings)
    with jax.set_mesh(self.trainer.mesh):
      sums = train_lib.eval_sums(self.trainer, params, self.batches)
    return _finite(sums["loss_sum"] / max(sums["tokens"], 1.0))

  def _checked(self, global_loss, sites, digests, losses, bad=None) -> Checked:
    scores = [None if global_loss is None or l is None else _finite(global_loss - l)
              for l in losses]
    return Checked(self.policy, self.validation_sha256, global_loss, list(sites),
                   list(digests), list(losses), scores, dict(bad or {}))

  def check_arrays(self, params: Mapping[str, np.ndarray], names: Sequence[str],
                   sent: Sequence[Mapping[str, Any]]) -> Checked:
    """The simulation's check: `sent` are the sites' encoded updates on the host (as
    `simulate` merges them), `params` the flat global params."""
    state = outer_lib.init_outer_state(self.probe_spec.tx, params)
    one = np.ones(1, np.float32)
    losses = []
    for d in sent:
      probe, _ = self.probe_spec.outer_step(params, state,
                                            [outer_lib.Update(exchange.as_update(d).delta)], one)
      losses.append(self.loss({n: np.asarray(v) for n, v in probe.items()}))
    return self._checked(self.loss(params), names, [""] * len(names), losses)

  def check_stored(self, glob: buckets.Bucket, base_prefix: str, base_manifest: Mapping,
                   inputs: Mapping[str, tuple[buckets.Bucket, str, Mapping]]) -> Checked:
    """The coordinator's check of committed updates `inputs` (site -> (bucket, round
    prefix, manifest), merge order) on global round `base_prefix`. An update the merge
    would refuse (`merge.BadUpdate`: corrupt, non-finite...) is not scored but listed in
    `Checked.bad`."""
    params_only = dict(base_manifest, arrays={k: v for k, v in base_manifest["arrays"].items()
                                              if k.startswith("params/")})
    base = {n[len("params/"):]: a for n, a in _read_whole(
        glob, exchange.data_prefix(base_prefix, base_manifest), params_only["arrays"]).items()}
    sites, digests, losses, bad = [], [], [], {}
    for site, inp in inputs.items():
      out = exchange.data_prefix(base_prefix, exchange.new_attempt())
      try:
        records = merge_lib.merge_round(self.probe_spec, glob, base_prefix, params_only, [inp],
                                        [1.0], self._scratch, out)
        probe = {n[len("params/"):]: a
                 for n, a in _read_whole(self._scratch, out, records).items()}
      except merge_lib.BadUpdate as e:
        bad[site] = e.reason
        continue
      finally:
        self._scratch.delete_prefix(out)
      sites.append(site)
      digests.append(exchange.manifest_digest(inp[2]))
      losses.append(self.loss(probe))
    return self._checked(self.loss(base), sites, digests, losses, bad)


def _read_whole(bucket: buckets.Bucket, data_prefix: str,
                records: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
  """Every array of `records` (stored under `data_prefix`), whole, chunk digests checked."""
  return {n: exchange.read_block(bucket, data_prefix, n, rec,
                                 tuple(slice(0, s) for s in rec["shape"]))
          for n, rec in records.items()}


def check_record(record: Mapping, sites: Sequence[str], digests: Sequence[str],
                 tokens: Sequence[int], cap: int | None) -> np.ndarray:
  """The audit's check of a round's `extra["contribution"]`: every merged input (`sites`
  with their update `digests`) was scored and kept, every refused site's score is one the
  policy refuses, each score is global_loss - loss; returns the weights the recorded
  scores give (to compare with the recorded ones). ValueError saying what disagrees."""
  p = Policy.from_config(record.get("policy"))
  scored = {s["site"]: s for s in record.get("sites", [])}
  g = record.get("global_loss")
  for s in scored.values():
    want = None if g is None or s["loss"] is None else _finite(g - s["loss"])
    if s["score"] != want:
      raise ValueError(f"site {s['site']}: recorded score {s['score']!r} is not global_loss "
                       f"{g!r} - loss {s['loss']!r}")
    if bool(s["refused"]) != p.refuses(s["score"]):
      raise ValueError(f"site {s['site']}: refused={s['refused']} but policy {p} with score "
                       f"{s['score']!r} gives {p.refuses(s['score'])}")
  scores = []
  for site, digest in zip(sites, digests):
    s = scored.get(site)
    if s is None or s["manifest_sha256"] != digest:
      raise ValueError(f"input {site} (update {digest[:16]}...) has no recorded score")
    if s["refused"]:
      raise ValueError(f"input {site} is recorded as refused but was merged")
    scores.append(s["score"])
  return p.weights(tokens, cap, scores)
