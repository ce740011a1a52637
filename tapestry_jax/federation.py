"""A federation config, seen from one party: who the sites are, where the buckets are,
what each site's own training config is, and the up-front checks.

Data flow: `experiments/configs/federation.py` -> `check_federation_config` (one clear
line per mistake, before anything compiles) -> `site_config(config, name)` gives the
single-site LM config that `tapestry_jax.site` trains with, `bucket_urls` the buckets
that the coordinator and the sites exchange through.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from data_pipelines.errors import DataError

from tapestry_jax import model as model_lib
from tapestry_jax import outer_config as outer_config_lib
from tapestry_jax import quantize
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax import update_codecs
from tapestry_jax import validate
from tapestry_jax.validate import ConfigError

GLOBAL = "global"  # The global bucket's name among the buckets (a site may not take it).
# The coordinator's party name: author of global rounds, its key in the trust root (a
# site may not take it either).
COORDINATOR = "coordinator"


def site_names(config) -> list[str]:
  """Site names in config order (the merge's fixed order is sorted(names))."""
  return list(config.sites.keys())


def site_config(config, name: str, *, reference: bool = False) -> ml_collections.ConfigDict:
  """The single-site LM config that site `name` trains with.

  The schedule spans the whole federation (rounds x inner_steps), and the site's data
  overrides (source, paths, languages, seed) are applied to the shared data section.
  A federated site also applies `federation.inner` (train fields its inner optimizer
  changes, e.g. FedAdam's plain SGD); `reference=True` leaves them out: the training
  recipe of `train` itself, which the references (each site alone, data parallelism)
  use."""
  if name not in config.sites:
    raise ConfigError(f"unknown site {name!r}; this federation's sites are {site_names(config)}")
  s = config.sites[name]
  c = ml_collections.ConfigDict({k: config[k] for k in ("model", "data", "train", "mesh")})
  c = ml_collections.ConfigDict(c.to_dict())  # A deep, unlocked copy.
  if s.source:
    c.data.source = s.source
  if s.paths:
    c.data.paths = s.paths
  if s.languages:
    c.data.synthetic.languages = s.languages
  c.data.seed = int(config.data.seed) + int(s.data_seed)
  for axis, size in s.mesh.items():
    if size:
      c.mesh[axis] = int(size)
  inner = config.federation.get("inner")
  if inner and not reference:
    for key, value in inner.items():
      if value is None:  # unset: the site keeps train's value
        continue
      if key not in c.train:
        raise ConfigError(f"federation.inner.{key} is not a train field")
      c.train[key] = value
  c.train.steps = int(config.federation.rounds) * int(config.federation.inner_steps)
  c.train.checkpoint_every = int(config.federation.inner_steps)
  return c


def bucket_urls(config, workdir: str) -> dict[str, str]:
  """Party name -> bucket URL; empty entries default to file://WORKDIR/buckets/<party>."""
  base = os.path.join(os.path.abspath(workdir), "buckets")
  urls = {GLOBAL: config.federation.global_bucket or "file://" + os.path.join(base, GLOBAL)}
  for name in site_names(config):
    urls[name] = config.sites[name].bucket or "file://" + os.path.join(base, name)
  return urls


def party_names(config) -> list[str]:
  """Every party that signs: the sites and the coordinator."""
  return [*site_names(config), COORDINATOR]


def default_key_file(workdir: str, party: str) -> str:
  """Where a party's private key is looked for when none is given: WORKDIR/keys/PARTY.key."""
  return os.path.join(os.path.abspath(workdir), "keys", f"{party}.key")


def party_trust(config, party: str, workdir: str, private_key: str | None = None,
                updates=None) -> tuple[trust.TrustRoot | None, trust.Signer | None]:
  """The trust root every party verifies against (live: it refuses an expired trust root
  and manifests dated beyond the clock skew) and `party`'s own signer.

  With federation.trust.require_signatures (the default) every party must have a public
  key in federation.trust.public_keys, and `party`'s private key (`private_key`, default
  WORKDIR/keys/PARTY.key) must match its public key, or a key that `updates` (the
  trust-root log, `exchange.read_trust_updates`) rotated it to. Without it: (None, None),
  nothing is signed or verified (for experiments on one trusted machine only)."""
  t = config.federation.trust
  if not bool(t.require_signatures):
    logging.warning("federation.trust.require_signatures is off: updates and global rounds "
                    "are neither signed nor verified")
    return None, None
  missing = [p for p in party_names(config) if not t.public_keys.get(p, "")]
  if missing:
    raise ConfigError(
        f"federation.trust.public_keys has no key for {missing}; every party needs one. "
        f"Create a key pair per party with `python -m launch.keygen --party=NAME --out=DIR` "
        f"and set --config.federation.trust.public_keys.NAME=ed25519:... (launch.federate "
        f"makes them itself for a federation run on one machine)")
  try:
    root = trust.TrustRoot.from_config(config, live=True)
    root.check_live()
    root.apply_updates(list(updates or []))
    signer = trust.Signer.from_file(party, private_key or default_key_file(workdir, party))
    root.check_signer(signer)
  except trust.TrustError as e:
    raise ConfigError(f"party {party!r}: {e}") from None
  return root, signer


def quorum(config) -> int:
  """Updates needed to close a round (federation.quorum, 0 = every site)."""
  return int(config.federation.quorum) or len(site_names(config))


def weight_cap(config) -> int:
  """Most tokens one site may claim for a round (the configured work of one round)."""
  f = config.federation
  return int(f.weight_cap_tokens) or (
      int(f.inner_steps) * int(config.train.global_batch_size) * int(config.data.seq_len))


def evaluate_round(config, round_: int) -> bool:
  """Whether sites evaluate global round `round_` (every eval_every-th, and the last)."""
  f = config.federation
  return round_ == int(f.rounds) or round_ % max(1, int(f.eval_every)) == 0


def outer_config(config) -> dict:
  """`federation.outer` as a plain dict with `decay_rounds` and `total_rounds` 0
  resolved to `federation.rounds`: what the coordinator builds its optimizer from and
  records in every global manifest (so an audit rebuilds the same schedules)."""
  f = config.federation
  out = outer_config_lib.default_outer_config().to_dict()
  out.update(f.outer.to_dict())
  if not out.get("decay_rounds"):
    out["decay_rounds"] = int(f.rounds)
  if not out.get("total_rounds"):
    out["total_rounds"] = int(f.rounds)
  if out.get("name") == "moments":  # The sites' AdamW decays, per inner step, and H.
    out["b1"], out["b2"] = float(config.train.b1), float(config.train.b2)
    if not out.get("steps_per_round"):
      out["steps_per_round"] = int(f.inner_steps)
  return out


def merge_spec(config) -> outer_config_lib.RoundMergeSpec:
  """The round merge of this federation (outer optimizer, weight cap, robust settings,
  outer clip), from the sections every global manifest records (`outer_config(config)`,
  `federation.robust`), so an audit rebuilds the same spec from them."""
  return outer_config_lib.RoundMergeSpec.from_config(
      outer_config(config), config.federation.get("robust"), weight_cap=weight_cap(config),
      download=download(config), moment_sync_every=moment_sync_every(config))


def download(config) -> dict | None:
  """`{"dtype", "block"}` of the rounds' encoded downloads (`federation.download_dtype`,
  `download_block`), what every global manifest records; None when off (float32: sites
  read the whole float32 round)."""
  f = config.federation
  dtype = f.get("download_dtype", "float32")
  if dtype == "float32":
    return None
  return {"dtype": dtype, "block": f.get("download_block", quantize.DEFAULT_BLOCK)}


def shared_moments(config) -> bool:
  """Whether sites start each round from the global Adam moments and send their first
  moment (`federation.outer.name` moments, `outer.SharedMoments`)."""
  return config.federation.outer.get("name") == "moments"


def moment_sync_every(config) -> int:
  """K, the rounds between syncs of the shared moments (`federation.moment_sync_every`,
  DES-LOC; 1 = every round), checked: ConfigError naming the field."""
  try:
    return outer_config_lib.check_moment_sync_every(
        config.federation.get("moment_sync_every", 1))
  except ValueError as e:
    raise ConfigError(f"federation.{e}") from None


def moment_round(config, round_: int) -> bool:
  """Whether global round `round_` syncs the shared moments: under outer moments, every
  K-th round (round_ % K == 0, round 0 included). Its updates carry the sites' first
  moments and sites adopt its global moments; in the other rounds (param rounds) they
  send pseudo-gradients only and keep training their own moments. False without shared
  moments."""
  return shared_moments(config) and outer_config_lib.syncs_moments(
      round_, moment_sync_every(config))


def param_schema(config) -> dict[str, tuple[tuple[int, ...], str]]:
  """Leaf name -> (shape, dtype) of the model every update and global round must match."""
  mcfg = model_lib.ModelConfig.from_config(config.model)
  abstract = jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.key(0)))
  return {n: (tuple(a.shape), str(a.dtype)) for n, a in trees.flatten(abstract).items()}


def update_spec(config) -> update_codecs.UpdateSpec:
  """How sites encode what they send (`federation.update_dtype`, `moment_dtype`,
  `quant_block`, `topk_density`), checked: ConfigError naming the bad field."""
  f = config.federation
  try:
    return update_codecs.UpdateSpec(
        dtype=f.get("update_dtype", "float32"), moment_dtype=f.get("moment_dtype", ""),
        block=f.get("quant_block", update_codecs.DEFAULT_BLOCK),
        density=f.get("topk_density", 0.0))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def error_feedback(config) -> bool:
  """Whether sites carry what encoding lost from their pseudo-gradients into their next
  one: `federation.error_feedback` (nothing is lost, so nothing is carried, in float32
  without top-k), and always with top-k (`federation.topk_density` > 0)."""
  f = config.federation
  return update_spec(config).error_feedback or (
      bool(f.get("error_feedback", False)) and f.get("update_dtype", "float32") != "float32")


def overlap_steps(config) -> int:
  """Inner steps a site trains from what it sent while the exchange runs, before it
  adopts the next global round (`federation.overlap_steps`, tau; 0 = off)."""
  return int(config.federation.get("overlap_steps", 0))


# What sites send: float32, bfloat16 (half the bytes, rounded by XLA), int8 or
# float8_e4m3fn (a quarter: per-tensor scaled codes, `tapestry_jax.quantize`), int4 or
# float4_e2m1fn (block-scaled 4-bit codes, `tapestry_jax.update_codecs`). The coordinator
# merges in float32.
UPDATE_DTYPES = update_codecs.DTYPES
# What sites read of each global round: float32 (the whole round) or block-scaled codes of
# its update (`federation.download_dtype`, `quantize.BlockFormat`).
DOWNLOAD_DTYPES = ("float32", *quantize.BLOCK_DTYPES)


def check_federation_config(config, devices: list[jax.Device] | None = None,
                            site: str | None = None) -> None:
  """Validates the outer loop, the party list and (one or every) site's config."""
  f = config.federation
  names = site_names(config)
  if not names:
    raise ConfigError("config.sites is empty: a federation needs at least one site")
  taken = sorted({GLOBAL, COORDINATOR} & set(names))
  if taken:
    raise ConfigError(f"site names {taken} are reserved for the coordinator; rename those sites")
  if site is not None and site not in names:
    raise ConfigError(f"unknown site {site!r}; this federation's sites are {names}")
  if int(f.rounds) <= 0 or int(f.inner_steps) <= 0:
    raise ConfigError(f"federation.rounds={f.rounds} and federation.inner_steps={f.inner_steps} "
                      "must be positive")
  if not 0 <= int(f.quorum) <= len(names):
    raise ConfigError(f"federation.quorum={f.quorum} must be between 0 (= all) and the "
                      f"{len(names)} sites")
  if float(f.deadline_s) < 0 or float(f.round_timeout_s) <= 0 or float(f.poll_s) <= 0:
    raise ConfigError("federation.deadline_s must be >= 0, round_timeout_s and poll_s > 0")
  if int(f.storage_retries) < 0:
    raise ConfigError(f"federation.storage_retries={f.storage_retries} must be >= 0")
  update_spec(config)  # update_dtype, moment_dtype, quant_block, topk_density
  tau = f.get("overlap_steps", 0)
  if isinstance(tau, bool) or not isinstance(tau, int) or not 0 <= tau <= int(f.inner_steps):
    raise ConfigError(f"federation.overlap_steps={tau!r} must be an integer from 0 (off) to "
                      f"federation.inner_steps={f.inner_steps}")
  if int(f.weight_cap_tokens) < 0:
    raise ConfigError(f"federation.weight_cap_tokens={f.weight_cap_tokens} must be >= 0")
  if f.get("download_dtype", "float32") not in DOWNLOAD_DTYPES:
    raise ConfigError(f"federation.download_dtype must be one of {', '.join(DOWNLOAD_DTYPES)}; "
                      f"got {f.download_dtype!r}")
  if download(config) is not None:
    problem = quantize.check_block(**download(config))
    if problem:
      raise ConfigError(f"federation.download_block: {problem}")
  try:
    outer_config_lib.make_outer_optimizer(outer_config(config))
  except ValueError as e:
    raise ConfigError(f"federation.outer: {e}") from None
  try:
    outer_config_lib.check_robust_config(f.get("robust"), len(names), int(f.quorum))
  except ValueError as e:
    raise ConfigError(f"federation.robust: {e}") from None
  from tapestry_jax import retention  # Built on this module.
  retention.keep_rounds(config)
  from tapestry_jax import contribution  # pylint: disable=import-outside-toplevel  (a cycle)
  try:
    contribution.check_config(config)
  except (ValueError, DataError) as e:
    raise ConfigError(f"federation.{e}") from None
  every = moment_sync_every(config)
  if every > 1 and not shared_moments(config):
    raise ConfigError(f"federation.moment_sync_every={every} syncs the shared Adam moments "
                      f"every {every} rounds; it needs federation.outer.name=moments (or 1)")
  if shared_moments(config):
    if int(f.outer.get("steps_per_round") or f.inner_steps) != int(f.inner_steps):
      raise ConfigError(f"federation.outer.steps_per_round={f.outer.steps_per_round} must be "
                        f"federation.inner_steps={f.inner_steps} (or 0) with outer moments")
    for name in ([site] if site is not None else names):
      inner = site_config(config, name).train.get("optimizer", "adamw")
      if inner != "adamw":
        raise ConfigError(f"site {name!r}: outer moments shares the sites' AdamW moments; "
                          f"its inner optimizer must be adamw (federation.inner.optimizer), "
                          f"not {inner}")
  elif f.get("moment_dtype", ""):
    raise ConfigError(f"federation.moment_dtype={f.moment_dtype!r} is for the first moments "
                      f"sites send under outer moments (federation.outer.name=moments); "
                      f"set it to '' with outer {f.outer.get('name')!r}")
  for name in ([site] if site is not None else names):
    try:
      validate.check_site_config(site_config(config, name), devices)
    except (ConfigError, DataError) as e:
      raise ConfigError(f"site {name!r}: {e}") from None
