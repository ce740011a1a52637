"""The round protocol: what a site publishes and what it reads back, by name and by check.

Built on `store` (committed rounds of named arrays). The layout of a round's arrays:
  update (a site's bucket, `store.update_prefix(r)`):
    NAME                the pseudo-gradient of parameter NAME, in federation.update_dtype
                        (its codes, or top-k values, for `update_codecs`' codecs; the
                        record's "quant" says which codec)
    inner_mu/NAME       (shared moments) the site's first moment of NAME, in
                        federation.moment_dtype, dense
    codec_scales/X      the float32 scales of array X's block-scaled or top-k codes
    codec_indices/X     the column indices of array X's top-k values
  global (the global bucket, `store.global_prefix(r)`):
    params/NAME         the global parameter NAME (float32)
    outer/NAME/LEAF     the outer optimizer's state leaf LEAF of NAME
    down/PART/NAME      (rounds >= 1 with federation.download_dtype on) the round's encoded
    down/PART_scale/NAME  download of NAME (`outer.Download`): block-scaled codes and their
                        float32 scales, PART "update" (the params' update) or, under shared
                        moments, "grad" (the round's mean gradient)
A site publishes with `publish_update` and reads a global round with `read_global_round`
(the coordinator's signature, freshness, schema and every chunk's digest checked), or,
holding the previous round, only its download with `read_global_download`; the
coordinator checks an update with `validate_update` before merging it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tapestry_jax import buckets
from tapestry_jax import federation
from tapestry_jax import outer as outer_lib
from tapestry_jax import quantize
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax import update_codecs
from tapestry_jax.exchange import blocks, store
from tapestry_jax.exchange.store import ExchangeError

PARAMS = "params/"
OUTER = "outer/"
# A site's first moment of parameter NAME (shared moments) travels as MOMENT_PREFIX + NAME.
MOMENT_PREFIX = "inner_mu/"
# The companion arrays of a coded array X (`update_codecs`): its scales and indices.
COMPANION_PREFIXES = {update_codecs.SCALES: "codec_scales/",
                      update_codecs.INDICES: "codec_indices/"}


def param_key(name: str) -> str:
  """The global round's array holding parameter `name`."""
  return PARAMS + name


def outer_key(name: str, leaf: str) -> str:
  """The global round's array holding outer-state leaf `leaf` of parameter `name`."""
  return f"{OUTER}{name}/{leaf}"


def moment_key(name: str) -> str:
  """The update's array holding the site's first moment of parameter `name`."""
  return MOMENT_PREFIX + name


DOWN = "down/"
DOWN_PARTS = ("update", "grad")  # The fields of `outer.Download`.


def down_key(part: str, name: str, scales: bool = False) -> str:
  """The global round's array holding the codes (or `scales`) of download part `part`
  ("update" or "grad") of parameter `name`."""
  if part not in DOWN_PARTS:
    raise ValueError(f"unknown download part {part!r}; one of {DOWN_PARTS}")
  return f"{DOWN}{part}{'_scale' if scales else ''}/{name}"


def companion_key(role: str, name: str) -> str:
  """The update's array holding the `role` part (`update_codecs.SCALES`, `INDICES`) of
  coded array `name` (its codes keep `name`; role `update_codecs.CODES` is `name`)."""
  return name if role == update_codecs.CODES else COMPANION_PREFIXES[role] + name


def stored_arrays(sent: dict[str, Any]) -> dict[str, Any]:
  """Every array an encoded update stores, by name: codes under the leaf's own name,
  their scales and indices under `companion_key` names (what is written and counted)."""
  return {companion_key(role, n): a for n, v in sent.items()
          for role, a in update_codecs.stored(v).items()}


def as_update(sent: dict[str, Any]) -> outer_lib.Update:
  """A sent update's flat arrays (first moments under `moment_key` names) as the typed
  `outer.Update` the outer math takes."""
  mu = {n[len(MOMENT_PREFIX):]: v for n, v in sent.items() if n.startswith(MOMENT_PREFIX)}
  return outer_lib.Update({n: v for n, v in sent.items() if not n.startswith(MOMENT_PREFIX)},
                          mu or None)


def global_arrays(params: dict[str, Any], outer_leaves: dict[str, dict[str, Any]]) -> dict:
  """A global round's named arrays from flat params and {name: {leaf: array}} state."""
  arrays = {param_key(n): a for n, a in params.items()}
  for n, leaves in outer_leaves.items():
    arrays.update({outer_key(n, k): v for k, v in leaves.items()})
  return arrays


def params_of(manifest: dict) -> list[str]:
  """The parameter names a global round's manifest holds, sorted."""
  return sorted(k[len(PARAMS):] for k in manifest["arrays"] if k.startswith(PARAMS))


# --------------------------------------------------------------------------- updates


def update_schema(config, round_: int | None = None) -> dict[str, tuple]:
  """Array name -> (shape, dtype) or (shape, dtype, quant) every site update must match:
  per parameter, the arrays its codec sends (`federation.update_spec`, `update_codecs.
  LeafCodec.layout`): floating leaves as federation.update_dtype (cast, per-tensor codes
  whose records must carry their offset and scale, or block / top-k codes whose records
  must name exactly their codec, with their scales and indices), first moments in
  federation.moment_dtype. The coordinator merges in float32 whatever sites sent.
  `round_`: the updates for that round, whose first moments are sent only if it is a
  moment round (`federation.moment_round`); None: under shared moments, with them."""
  spec = federation.update_spec(config)
  out = {}
  params = federation.param_schema(config)
  taken = sorted(n for n in params for p in (MOMENT_PREFIX, *COMPANION_PREFIXES.values())
                 if n.startswith(p) or n == p.rstrip("/"))
  if taken:
    raise ExchangeError(f"parameter names {taken} collide with the update's array names "
                        f"({MOMENT_PREFIX}..., {', '.join(COMPANION_PREFIXES.values())}...)")
  leaves = [(n, shape, d, False) for n, (shape, d) in params.items()]
  moments = (federation.shared_moments(config) if round_ is None
             else federation.moment_round(config, round_))
  if moments:  # The site's first moment of each parameter.
    leaves += [(MOMENT_PREFIX + n, shape, d, True) for n, (shape, d) in params.items()]
  for n, shape, d, moment in leaves:
    # jnp.issubdtype: numpy's does not count bfloat16 (an ml_dtypes type) as floating.
    if not jnp.issubdtype(store.np_dtype(d), jnp.floating):
      out[n] = (shape, d)
      continue
    for role, layout in spec.leaf_codec(shape, moment).layout(shape).items():
      out[companion_key(role, n)] = layout
  return out


def encode_update(delta, config) -> dict[str, Any]:
  """A site's update as it is sent, on the site's devices: a flat {name: leaf} dict
  (first moments under `moment_key` names) with floating leaves encoded by their codec
  (`federation.update_spec`): cast by XLA (round to nearest even), or `quantize.Quantized`,
  `update_codecs.BlockCoded` or `update_codecs.TopK` codes. Encoded leaves pass as they
  are. What the site publishes and the simulation merges. ValueError for coded values
  with NaN or Inf."""
  spec = federation.update_spec(config)
  out = {}
  for name, x in trees.flatten(delta).items():
    if isinstance(x, update_codecs.CODED) or not jnp.issubdtype(x.dtype, jnp.floating):
      out[name] = x  # Already encoded (e.g. by `site.SiteWorker.encoded_update`), or not float.
    else:
      out[name] = spec.leaf_codec(np.shape(x), name.startswith(MOMENT_PREFIX)).encode(x)
  return out


def decode_update(sent: dict[str, Any]) -> dict[str, Any]:
  """float32 values of an encoded update (`encode_update`'s output), on its devices."""
  return {n: update_codecs.decode_leaf(v) for n, v in sent.items()}


def diverged(name: str, round_: int) -> ExchangeError:
  """The error a site stops with when its update for `round_` is not finite."""
  return ExchangeError(
      f"site {name}: the update for round {round_} has non-finite values (NaN or Inf): "
      f"training diverged; not publishing it (the coordinator would refuse it)")


def publish_update(bucket: buckets.Bucket, config, name: str, round_: int, base_round: int,
                   delta, tokens: int, extra: dict,
                   signer: trust.Signer | None = None, channel=None) -> dict:
  """Writes this site's update for `round_` (arrays, then the manifest signed by
  `signer`, then the commit marker, created last). `delta` is the pseudo-gradient, or
  the flat dict `SiteWorker.encoded_update` made of it (encoded once, not again).

  A site of several processes passes its `distributed.Channel` and calls this on every
  process: each writes the chunks of its own shards, their digests (and its shards'
  sums of squares, for the declared norm) are gathered, process 0 signs the one manifest
  and commits once every process's chunks are durable, and every process returns it.

  A round this site already committed (a restart after publishing) is kept as it is:
  committed data is never rewritten."""
  prefix = store.update_prefix(round_)
  existing = store.read_manifest(bucket, prefix)
  if existing is not None:
    logging.info("site %s: round %d already committed in %s; keeping it", name, round_, bucket.url)
    return existing
  bad = diverged(name, round_)
  # Sent in federation.update_dtype; the norm is of what is sent.
  try:
    sent = encode_update(delta, config)
  except ValueError:  # int8: a NaN or Inf leaves nothing to quantize.
    raise bad from None
  # Declared so that the coordinator can clip in its one streaming pass (it checks the
  # claim against what it reads); the simulation's function, so both clip alike. The norm
  # of the pseudo-gradient only: under shared moments, the first moments it also sends
  # are scaled by the same clip factor.
  deltas = {n: v for n, v in sent.items() if not n.startswith(MOMENT_PREFIX)}
  norm = _combined_norm([_shard_squares(deltas)]) if channel is None else None
  if norm is not None and not np.isfinite(norm):
    raise bad
  # Deterministic, so every process of a multi-process site writes the same attempt.
  attempt = store.new_attempt(f"{name}/{round_}/{base_round}")
  records = store.write_arrays(bucket, store.data_prefix(prefix, attempt), stored_arrays(sent))
  if channel is not None:  # Durable here on every process: combine, then commit.
    key = f"publish/{round_}/{attempt}"
    parts = channel.gather(key, {"records": store.compact_records(records),
                                 "squares": _shard_squares(deltas)})
    records = store.merge_records([store.expand_records(p["records"]) for p in parts])
    norm = _combined_norm([p["squares"] for p in parts])
    if not np.isfinite(norm):
      raise bad
  for n, v in sent.items():  # Codes: their codec's parameters, signed with the rest.
    if isinstance(v, update_codecs.CODED):
      records[n] = dict(records[n], quant=v.params())
  manifest = store.make_manifest(
      federation=config.federation.id, kind="update", round=round_, author=name,
      attempt=attempt, base_round=base_round, tokens=int(tokens), arrays=records,
      extra=dict(extra, update_norm=norm))
  if signer is not None:
    manifest = signer.sign(manifest)
  if channel is None:
    store.write_manifest(bucket, prefix, manifest)
    return manifest
  if jax.process_index() == 0:
    store.write_manifest(bucket, prefix, manifest)
  channel.broadcast(f"{key}/committed", store.manifest_digest(manifest))
  committed = store.read_manifest(bucket, prefix)
  # Each process dated its own copy: the content signed is what must agree.
  if committed is None or (store.manifest_digest(trust.unstamped(committed))
                           != store.manifest_digest(trust.unstamped(manifest))):
    raise ExchangeError(f"site {name}: process {jax.process_index()} built another manifest "
                        f"for round {round_} than the one committed")
  return committed


def update_norm(sent: dict[str, Any]) -> float:
  """The norm a site declares for its update (`extra["update_norm"]`, what the per-site
  clip scales by): of the pseudo-gradient only (not the first moments), in float64, as
  the sum of every shard's squares (leaves in name order, shards in index order), so a
  site of one or several processes and the simulation, on the same mesh, declare the
  same number. This process's shards: the whole update in a single process."""
  deltas = {n: v for n, v in sent.items() if not n.startswith(MOMENT_PREFIX)}
  return _combined_norm([_shard_squares(deltas)])


def _shard_squares(deltas: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Per leaf, the float64 sum of squares of each shard this process writes (replica 0),
  keyed by the shard's start. A block or top-k coded leaf's codes are sharded by rows
  (their last axis whole), like their scales and indices: each row shard is summed with
  its own scales and indices."""
  out = {}
  for n, v in deltas.items():
    parts = update_codecs.stored(v)
    codes = parts[update_codecs.CODES]
    if isinstance(codes, jax.Array):
      pieces = [(s.index, s.data) for s in codes.addressable_shards if s.replica_id == 0]
    else:
      pieces = [((), codes)]
    sums = {}
    for index, data in pieces:
      start = ",".join(str(sl.start or 0) for sl in index)
      data = np.asarray(data)
      if isinstance(v, quantize.Quantized):
        sums[start] = quantize.sum_squares(data, float(v.offset), float(v.scale))
      elif isinstance(v, update_codecs.CODED):
        shard = {role: _rows(a, tuple(index)[:-1]) for role, a in parts.items()
                 if role != update_codecs.CODES}
        shard[update_codecs.CODES] = data
        sums[start] = update_codecs.sum_squares(update_codecs.codec_of(v).leaf(shard, v.shape))
      else:
        sums[start] = outer_lib.sum_squares(data)
    out[n] = sums
  return out


def _rows(a, lead: tuple[slice, ...]) -> np.ndarray:
  """The rows `lead` (slices of the leading axes, () = all) of a companion array, from
  a shard held here (any replica: every process sums the rows of the codes it writes)."""
  if not isinstance(a, jax.Array) or not lead:
    return np.asarray(a)[lead]
  key = [sl.start or 0 for sl in lead]
  for s in a.addressable_shards:
    if [sl.start or 0 for sl in tuple(s.index)[:-1]] == key:
      return np.asarray(s.data)
  raise ValueError(f"no shard of rows {lead} here; codes and their scales and indices must "
                   f"be sharded alike (by rows)")


def _combined_norm(per_process: list[dict[str, dict[str, float]]]) -> float:
  """The update's L2 norm from every process's shard sums: leaves in name order, shards
  in index order (the same sum on every process)."""
  total = 0.0
  for n in sorted({n for p in per_process for n in p}):
    parts = {k: v for p in per_process for k, v in p.get(n, {}).items()}
    for k in sorted(parts, key=lambda k: tuple(int(i) for i in k.split(",") if i)):
      total += parts[k]
  return math.sqrt(total)


def validate_update(manifest: dict, config, site: str, round_: int, base_round: int,
                    schema, root: trust.TrustRoot | None = None) -> str | None:
  """Why this committed update may not be merged into `round_` (None = acceptable).

  In order: the author's signature (when `root` is given; forged, unknown-key and
  altered manifests stop here), the federation, the author, freshness (an update
  replayed from another round, or trained from another global round, is refused) and
  the schema (names, shapes, dtypes: checked before anything is allocated)."""
  if root is not None:
    try:
      root.verify(manifest, site, round_)
    except trust.TrustError as e:
      return f"bad signature: {e}"
  if manifest.get("kind") != "update" or manifest.get("federation") != config.federation.id:
    return (f"not an update of this federation ({manifest.get('kind')!r} of federation "
            f"{manifest.get('federation')!r}, expected an update of {config.federation.id!r})")
  if manifest.get("author") != site:
    return f"author {manifest.get('author')!r} is not the bucket's owner {site!r}"
  if manifest.get("round") != round_:
    return f"manifest round {manifest.get('round')} != {round_} (replayed from another round?)"
  if manifest.get("base_round") != base_round:
    return f"trained from global round {manifest.get('base_round')}, expected {base_round} (stale)"
  tokens = manifest.get("tokens")
  if not isinstance(tokens, int) or tokens <= 0:
    return f"token count {tokens!r} is not a positive integer"
  why = _moments_problem(manifest, config, round_)
  if why is not None:
    return why
  try:
    store.check_schema(manifest, schema)
  except ExchangeError as e:
    return str(e)
  return None


def _moments_problem(manifest: dict, config, round_: int) -> str | None:
  """Why an update's first moments do not fit `round_` under shared moments synced every
  K > 1 rounds (carried on a param round, missing on a moment round); None if they do."""
  every = federation.moment_sync_every(config)
  arrays = manifest.get("arrays")
  if every == 1 or not federation.shared_moments(config) or not isinstance(arrays, dict):
    return None
  has = any(k.startswith(MOMENT_PREFIX) for k in arrays)
  want = federation.moment_round(config, round_)
  if has and not want:
    return (f"carries first moments ({MOMENT_PREFIX}...) for round {round_}, a param round "
            f"(federation.moment_sync_every={every}: only rounds divisible by {every} sync "
            f"the moments)")
  if want and not has:
    return (f"lacks the first moments ({MOMENT_PREFIX}...) for round {round_}, a moment "
            f"round (federation.moment_sync_every={every})")
  return None


def check_moment_round(manifest: dict, config, round_: int, where: str) -> None:
  """ExchangeError if global round `round_`'s manifest records a moment sync
  (`extra["moment_round"]`, written when federation.moment_sync_every > 1) other than
  the schedule's (`federation.moment_round`)."""
  if not federation.shared_moments(config) or federation.moment_sync_every(config) == 1:
    return
  recorded = (manifest.get("extra") or {}).get("moment_round")
  want = federation.moment_round(config, round_)
  if round_ >= 1 and recorded is not want:
    raise ExchangeError(f"{where}: global round {round_} records moment_round={recorded!r}; "
                        f"federation.moment_sync_every={federation.moment_sync_every(config)} "
                        f"makes it {want}")


# --------------------------------------------------------------------------- global rounds


def download_parts(config, round_: int | None = None) -> tuple[str, ...]:
  """The `outer.Download` fields a global round's download holds: the params' update
  and, under shared moments, the round's mean gradient (of round `round_`: only in a
  moment round, `federation.moment_round`)."""
  moments = (federation.shared_moments(config) if round_ is None
             else federation.moment_round(config, round_))
  return DOWN_PARTS if moments else DOWN_PARTS[:1]


def download_schema(config, schema=None, round_: int | None = None) -> dict[str, tuple]:
  """Array name -> (shape, dtype) of a global round's download (`down_key` names) under
  `federation.download_dtype`: codes shaped like each parameter (4-bit ones packed two per
  uint8 along its last axis, `quantize.codes_shape`), float32 scales one per
  `federation.download_block` elements of its last axis."""
  settings = federation.download(config)
  if settings is None:
    raise ValueError("federation.download_dtype is float32: global rounds have no download")
  out = {}
  dtype = settings["dtype"]
  for n, (shape, _) in (schema or federation.param_schema(config)).items():
    for part in download_parts(config, round_):
      out[down_key(part, n)] = (quantize.codes_shape(shape, dtype), quantize.stored_dtype(dtype))
      out[down_key(part, n, scales=True)] = (quantize.scales_shape(shape, settings["block"]),
                                             "float32")
  return out


TRUST_LOG = "trust/updates/"


def trust_update_key(seq: int) -> str:
  """Where trust-root update number `seq` (1, 2, ...) lives in the global bucket."""
  return f"{TRUST_LOG}{int(seq):06d}.json"


def read_trust_updates(bucket: buckets.Bucket) -> list[dict]:
  """The trust-root log in global bucket `bucket`: every published trust-root update
  (`trust.key_update`), in order; ExchangeError for a gap or a record that is not JSON.
  Its signatures are checked where it is applied (`refresh_trust`)."""
  keys = sorted(k for k in bucket.list(TRUST_LOG)
                if re.fullmatch(r"trust/updates/\d{6}\.json", k))
  out = []
  for seq, key in enumerate(keys, 1):
    if key != trust_update_key(seq):
      raise ExchangeError(f"{bucket.url}: the trust-root log has a gap: update #{seq} is "
                          f"missing ({key} is next)")
    data = bucket.read(key)
    try:
      record = json.loads(data) if data is not None else None
    except ValueError:
      record = None
    if not isinstance(record, dict):
      raise ExchangeError(f"{bucket.url}/{key}: not a trust-root update (JSON object)")
    out.append(record)
  return out


def publish_trust_update(bucket: buckets.Bucket, record: dict) -> str:
  """Adds signed trust-root update `record` (`trust.key_update`) to the log in global
  bucket `bucket` with a create-only write (a published update is never replaced);
  returns its key. ExchangeError if its number is taken."""
  key = trust_update_key(record.get("seq", 0))
  data = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
  if not bucket.create(key, data):
    raise ExchangeError(f"{bucket.url}/{key}: trust-root update #{record.get('seq')} is "
                        f"already published; make the next one on top of the current log")
  return key


def refresh_trust(root: trust.TrustRoot | None, bucket: buckets.Bucket) -> None:
  """Applies to `root` (None: unsigned federation) the trust-root updates published in
  global bucket `bucket` since it last looked; ExchangeError if the log is refused
  (forged, tampered, not signed by federation.trust.root_key, records removed)."""
  if root is None:
    return
  try:
    root.apply_updates(read_trust_updates(bucket))
  except trust.TrustError as e:
    raise ExchangeError(f"{bucket.url}: refusing the trust-root log: {e}") from None


def change_key(bucket: buckets.Bucket, config, signer: trust.Signer, party: str,
               from_round: int, new_key: str | None) -> dict:
  """Signs (with `signer`, the root key's holder) and publishes in global bucket `bucket`
  the next trust-root update: from round `from_round` on, `party`'s key is `new_key`
  ("ed25519:..."), or None: revoked. Checked as every reader will check it before it is
  published; returns it. ExchangeError if the log or the update is refused."""
  root = trust.TrustRoot.from_config(config)
  refresh_trust(root, bucket)
  try:
    record = trust.key_update(signer, root, party, from_round, new_key)
    root.apply_updates(root.updates + [record])
  except trust.TrustError as e:
    raise ExchangeError(f"{bucket.url}: refusing to publish the trust-root update: {e}") from None
  publish_trust_update(bucket, record)
  return record


class StaleRoundError(ExchangeError):
  """A global round signed longer ago than federation.trust.max_global_age_s allows."""


def read_global_manifest(bucket, prefix: str, root: trust.TrustRoot | None) -> dict:
  """The manifest of committed global round `prefix`, its coordinator's signature
  verified with `root` (None: unsigned federation; first brought up to date with the
  bucket's trust-root log). ExchangeError if it is not committed or the signature does
  not verify."""
  manifest = store.read_manifest(bucket, prefix)
  if manifest is None:
    raise ExchangeError(f"{bucket.url}/{prefix} is not committed")
  if root is not None:
    refresh_trust(root, bucket)
    try:
      root.verify(manifest, federation.COORDINATOR)
    except trust.TrustError as e:
      raise ExchangeError(f"{bucket.url}/{prefix}: refusing the global model: "
                                   f"{e}") from None
  return manifest


class RollbackError(ExchangeError):
  """The global bucket offers a round older than one this site already trained from."""


def read_global(bucket: buckets.Bucket, config, round_: int, shardings,
                schema=None, root: trust.TrustRoot | None = None,
                last_round: int | None = None) -> tuple[Any, dict]:
  """Reads committed global round `round_`'s params into `shardings` (a params pytree of
  shardings) after verifying it: the coordinator's signature (with `root`), that it is
  round `round_` of this federation and not older than `last_round` (the newest global
  this site has adopted: a rollback is refused), and its schema, before anything is
  allocated. Every chunk is checked against the signed digests as it is read."""
  prefix = store.global_prefix(round_)
  manifest = _global_manifest(bucket, config, round_, root, last_round)
  schema = {f"params/{n}": v for n, v in (schema or federation.param_schema(config)).items()}
  params_manifest = dict(manifest, arrays={k: v for k, v in manifest["arrays"].items()
                                           if k.startswith("params/")})
  store.check_schema(params_manifest, schema)
  flat_shardings = {f"params/{n}": s for n, s in trees.flatten(shardings).items()}
  flat = store.read_arrays(bucket, prefix, params_manifest, flat_shardings)
  params = trees.unflatten({n[len("params/"):]: a for n, a in flat.items()}, shardings)
  return params, manifest


def _global_manifest(bucket: buckets.Bucket, config, round_: int, root, last_round) -> dict:
  """Global round `round_`'s manifest: signature, federation, round and no rollback
  checked (`read_global`)."""
  if last_round is not None and round_ < last_round:
    raise RollbackError(f"{bucket.url}: global round {round_} is older than round "
                        f"{last_round}, which this site already trained from; refusing "
                        f"to roll back")
  prefix = store.global_prefix(round_)
  manifest = read_global_manifest(bucket, prefix, root)
  fid = config.federation.id
  if manifest.get("kind") != "global" or manifest.get("round") != round_ or \
      manifest.get("federation") != fid:
    raise ExchangeError(
        f"{bucket.url}/{prefix}: manifest is not global round {round_} of federation {fid!r}")
  if root is not None:  # A frozen or replaying coordinator (federation.trust.max_global_age_s).
    try:
      root.check_age(manifest, f"global round {round_}")
    except trust.TrustError as e:
      raise StaleRoundError(f"{bucket.url}/{prefix}: {e}") from None
  return manifest


def read_global_download(bucket: buckets.Bucket, config, round_: int, shardings,
                         scale_sharding, schema=None, root: trust.TrustRoot | None = None,
                         last_round: int | None = None) -> tuple[dict[str, Any], dict]:
  """The download of committed global round `round_` >= 1 (what a site holding round
  `round_` - 1 reads instead of the whole round): ({param name: `outer.Download`},
  manifest). Verified like `read_global` (signature, federation, round, no rollback),
  and: the round is merged from round `round_` - 1, its download arrays match
  `download_schema` and the configured block (before anything is read), every chunk its
  digest, every scale is finite, > 0 and decodes its codes within float32, and 4-bit
  codes are ones an encoder writes (`quantize.check_codes`). Codes go into `shardings` (a
  params pytree of shardings; packed codes with the last axis whole,
  `quantize.BlockFormat.codes_sharding`), scales into `scale_sharding`. What the codes
  decode to is checked where they are applied (`outer.download_step`'s flag)."""
  settings = federation.download(config)
  if settings is None:
    raise ValueError("federation.download_dtype is float32: global rounds have no download")
  prefix = store.global_prefix(round_)
  manifest = _global_manifest(bucket, config, round_, root, last_round)
  where = f"{bucket.url}/{prefix}"
  if round_ < 1 or manifest.get("base_round") != round_ - 1:
    raise ExchangeError(f"{where}: global round {round_} is not merged from round "
                        f"{round_ - 1} (base round {manifest.get('base_round')!r}); it has "
                        f"no download from it")
  check_moment_round(manifest, config, round_, where)
  expected = download_schema(config, schema, round_)
  down_manifest = dict(manifest, arrays={k: v for k, v in manifest["arrays"].items()
                                         if k.startswith(DOWN)})
  store.check_schema(down_manifest, expected)
  parts = download_parts(config, round_)
  names = list(trees.flatten(shardings))
  for key in (down_key(part, n) for n in names for part in parts):
    block = down_manifest["arrays"][key].get("block")
    if block != settings["block"]:
      raise ExchangeError(f"{where}: array {key!r} is coded in blocks of {block!r}, "
                          f"federation.download_block is {settings['block']}")
  flat_shardings = {}
  fmt = quantize.BlockFormat(settings["dtype"], settings["block"])
  param_schema = schema or federation.param_schema(config)
  for n, s in trees.flatten(shardings).items():
    for part in parts:
      flat_shardings[down_key(part, n)] = fmt.codes_sharding(s, len(param_schema[n][0]))
      flat_shardings[down_key(part, n, scales=True)] = scale_sharding
  flat = store.read_arrays(bucket, prefix, down_manifest, flat_shardings)
  out = {}
  for n in names:
    fields = {}
    for part in parts:
      scales = flat[down_key(part, n, scales=True)]
      problem = quantize.check_scales(np.asarray(scales.addressable_shards[0].data),
                                      settings["dtype"])
      if problem:
        raise ExchangeError(f"{where}: array {down_key(part, n, scales=True)!r}: {problem}")
      problem = quantize.check_codes(flat[down_key(part, n)], fmt.dtype, param_schema[n][0])
      if problem:
        raise ExchangeError(f"{where}: array {down_key(part, n)!r}: {problem}")
      fields[part] = quantize.BlockCodes(flat[down_key(part, n)], scales)
    out[n] = outer_lib.Download(**fields)
  return out, manifest


def read_global_moments(bucket: buckets.Bucket, config, round_: int, manifest: dict,
                        shardings, schema=None) -> dict[str, dict[str, Any]]:
  """Outer moments: the global Adam moments of round `round_` (whose manifest
  `read_global` verified), {param name: {"count", "mu", "nu"}}, mu and nu read straight
  into `shardings` (the params'), every chunk checked against the signed digests; the
  schema (float32 moments shaped like the params, an int32 count) before anything is
  read."""
  prefix = store.global_prefix(round_)
  params_schema = schema or federation.param_schema(config)
  expected = {}
  for n, (shape, _) in params_schema.items():
    expected.update({f"outer/{n}/mu": (shape, "float32"), f"outer/{n}/nu": (shape, "float32"),
                     f"outer/{n}/count": ((), "int32")})
  moments_manifest = dict(manifest, arrays={k: v for k, v in manifest["arrays"].items()
                                            if k.startswith("outer/")})
  store.check_schema(moments_manifest, expected)
  flat_shardings = {}
  for n, s in trees.flatten(shardings).items():
    flat_shardings.update({f"outer/{n}/mu": s, f"outer/{n}/nu": s})
  flat = store.read_arrays(bucket, prefix, moments_manifest, flat_shardings)
  data = store.data_prefix(prefix, manifest)
  out = {}
  for n in params_schema:
    key = f"outer/{n}/count"
    count = blocks.read_block(bucket, data, key, manifest["arrays"][key], ())
    out[n] = {"count": count, "mu": flat[f"outer/{n}/mu"], "nu": flat[f"outer/{n}/nu"]}
  return out


def read_global_round(bucket: buckets.Bucket, config, round_: int, shardings, schema=None,
                      root: trust.TrustRoot | None = None,
                      last_round: int | None = None) -> tuple[Any, dict | None, dict]:
  """What a site reads of global round `round_` before training on it: (params, the
  global moments under outer "moments" in a moment round (`federation.moment_round`)
  else None, manifest), all verified (`read_global`, `read_global_moments`)."""
  params, manifest = read_global(bucket, config, round_, shardings, schema, root=root,
                                 last_round=last_round)
  check_moment_round(manifest, config, round_, f"{bucket.url}/{store.global_prefix(round_)}")
  # Shared moments synced every K rounds: a param round's moments are not adopted.
  moments = (read_global_moments(bucket, config, round_, manifest, shardings, schema)
             if federation.moment_round(config, round_) else None)
  return params, moments, manifest


_ROLLBACK_WARNED: set[tuple[str, int]] = set()


def newer_global_round(glob: buckets.Bucket, last_base: int) -> int | None:
  """The round LATEST names if it is newer than `last_base`; None to keep waiting.

  A pointer that went backwards (a rollback, by a faulty or hostile writer of the global
  bucket) is refused and logged once; the site keeps waiting for a newer round."""
  r = store.read_latest(glob)
  if r is not None and r < last_base and (glob.url, r) not in _ROLLBACK_WARNED:
    _ROLLBACK_WARNED.add((glob.url, r))
    logging.warning("refusing rollback: %s LATEST names global round %d, older than round %d "
                    "this site already trained from", glob.url, r, last_base)
  return r if r is not None and r > last_base else None
