"""Audit: recompute a committed global round from the signed inputs it names.

A global round's manifest, signed by the coordinator, names everything the merge used:
the previous global round (by manifest digest), every site update (site, round,
manifest digest, tokens, weight), the outer optimizer and the merge settings (weight
cap, clipping, aggregator). `audit_round` checks each of those claims and redoes the
merge:

  1. the round's and its base round's signatures (trust root, with the trust-root
     updates of the global bucket's log: each with the key valid for its round), and the
     base's digest;
  2. each input update: committed in its site's bucket, the digest the round names, the
     site's signature, freshness (this round, trained from the base round), and the
     signed dates in causal order (base, then inputs, then the round, within
     federation.trust.max_clock_skew_s; a round's age is not held against it);
  3. the weights: recomputed from the signed token counts and the recorded cap (with the
     contribution check on, and the recorded scores: `contribution.check_record`; the
     scores themselves are not recomputed, the validation set being the coordinator's);
  4. the merge: `merge.merge_round` on exactly those inputs into a scratch bucket (every
     chunk it reads is checked against its writer's signed digests), and the result's
     chunk digests compared with the round's: equal digests mean bit-identical arrays
     (with downloads on, the encoded download too);
  5. the stored arrays of the round itself, read back and checked against its digests.

Round 0 (no inputs) is recomputed from the config: the initial params and outer state.
The merge is deterministic (fixed site order, float32, fixed accumulation order), which
is what makes 4 an equality, not a tolerance.
`audit_federation` audits many rounds in turn (what `launch.audit` runs).

Under retention (`federation.retention.keep_rounds`) the rounds below the coordinator's
signed floor are removed, and with them what the floor round itself was merged from:
those rounds are reported as collected, not audited (`tapestry_jax.retention`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from typing import Any, Callable, Iterable

import numpy as np

from tapestry_jax import buckets
from tapestry_jax import contribution
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import merge as merge_lib
from tapestry_jax import outer as outer_lib
from tapestry_jax import outer_config
from tapestry_jax import retention
from tapestry_jax import trust


class AuditError(exchange.ExchangeError):
  """A claim of the round cannot be checked at all (missing round, bad signature...)."""


def arrays_digest(manifest: dict) -> str:
  """One sha256 over a manifest's per-array digests (name order): its content id."""
  h = hashlib.sha256()
  for name in sorted(manifest["arrays"]):
    h.update(f"{name}:{manifest['arrays'][name]['digest']}\n".encode())
  return h.hexdigest()


def _signed_at(manifest: dict, what: str) -> float | None:
  text = manifest.get(trust.TIMESTAMP)
  try:
    return None if text is None else trust.parse_utc(text, what=f"{what}: signed timestamp")
  except trust.TrustError as e:
    raise AuditError(str(e)) from None


def _check_dates(round_: int, base: dict, manifest: dict, updates: dict[str, dict],
                 skew_s: float) -> None:
  """The signed dates follow the round's causality, within the clock skew: its base round,
  then each input update (trained from the base), then the round (merged from them).
  Manifests signed before dates were recorded are not checked."""
  t_base = _signed_at(base, f"global round {round_ - 1}")
  t_round = _signed_at(manifest, f"global round {round_}")
  if t_base is not None and t_round is not None and t_round < t_base - skew_s:
    raise AuditError(f"global round {round_} is dated {manifest[trust.TIMESTAMP]}, before its "
                     f"base round {round_ - 1} ({base[trust.TIMESTAMP]}): dates go backwards")
  for site, update in updates.items():
    t = _signed_at(update, f"update of site {site}")
    if t is None:
      continue
    if t_base is not None and t < t_base - skew_s:
      raise AuditError(f"update of site {site} for round {round_} is dated "
                       f"{update[trust.TIMESTAMP]}, before the global round {round_ - 1} it "
                       f"was trained from ({base[trust.TIMESTAMP]})")
    if t_round is not None and t > t_round + skew_s:
      raise AuditError(f"update of site {site} for round {round_} is dated "
                       f"{update[trust.TIMESTAMP]}, after the global round merged from it "
                       f"({manifest[trust.TIMESTAMP]})")


def _verify(root, manifest: dict, author: str, what: str) -> str:
  if root is None:
    return "unsigned (trust.require_signatures is off)"
  try:
    root.verify(manifest, author)
  except trust.TrustError as e:
    raise AuditError(f"{what}: {e}") from None
  return f"ok ({author}, key {manifest['signature']['key_id']})"


def _read(bucket: buckets.Bucket, prefix: str, what: str) -> dict:
  manifest = exchange.read_manifest(bucket, prefix)
  if manifest is None:
    raise AuditError(f"{what} ({bucket.url}/{prefix}) is not committed")
  return manifest


def _check_stored(bucket: buckets.Bucket, prefix: str, manifest: dict) -> int:
  """Reads every chunk of a committed round, checking its digest; returns bytes read."""
  data = exchange.data_prefix(prefix, manifest)
  nbytes = 0
  for name, rec in sorted(manifest["arrays"].items()):
    store = exchange.open_array(bucket, data, name, rec)
    for index in exchange.iter_blocks(rec, merge_lib.DEFAULT_MAX_BLOCK_BYTES):
      nbytes += exchange.read_block(bucket, data, name, rec, index, store=store).nbytes
  return nbytes


def audit_round(config, workdir: str, round_: int, *, credentials: str | None = None,
                scratch_dir: str | None = None) -> dict[str, Any]:
  """Checks committed global round `round_` (see the module docstring).

  Returns a report: provenance (base round, inputs with their digests and signatures),
  `identical` (whether the recomputation matched bit for bit) and `mismatches` (array
  names that differ). Raises AuditError when a claim cannot be checked at all."""
  f = config.federation
  urls = federation.bucket_urls(config, workdir)
  retries = int(f.storage_retries)
  glob = buckets.Bucket(urls[federation.GLOBAL], max_retries=retries, credentials=credentials)
  # Not live: rounds signed before the trust root expired still verify after it.
  root = trust.TrustRoot.from_config(config) if f.trust.require_signatures else None
  try:
    exchange.refresh_trust(root, glob)
  except exchange.ExchangeError as e:
    raise AuditError(str(e)) from None
  prefix = exchange.global_prefix(round_)
  below = retention.collected_below(glob, config, root)
  if 0 < below and round_ <= below:
    raise AuditError(f"global round {round_} cannot be recomputed: retention "
                     f"(federation.retention.keep_rounds) collected the global rounds below "
                     f"{below}; rounds from {below + 1} on can be audited")
  manifest = _read(glob, prefix, f"global round {round_}")
  report: dict[str, Any] = {
      "round": round_, "federation": manifest["federation"],
      "manifest_sha256": exchange.manifest_digest(manifest),
      "arrays_sha256": arrays_digest(manifest),
      "signature": _verify(root, manifest, federation.COORDINATOR, f"global round {round_}"),
      "inputs": [], "mismatches": []}
  if manifest["kind"] != "global" or manifest["round"] != round_ or \
      manifest["federation"] != f.id:
    raise AuditError(f"{glob.url}/{prefix} is not global round {round_} of federation {f.id!r}")

  scratch_root = tempfile.mkdtemp(prefix="tapestry-audit-", dir=scratch_dir)
  try:
    scratch = buckets.Bucket("file://" + scratch_root)
    out = exchange.data_prefix(prefix, exchange.new_attempt())
    if round_ == 0:
      from tapestry_jax import coordinator  # The coordinator's own round 0.
      params, state = coordinator.initial_round(config)
      arrays = {f"params/{n}": a for n, a in params.items()}
      for n, s in state.items():
        arrays.update({f"outer/{n}/{k}": np.asarray(v)
                       for k, v in outer_lib.state_leaves(s).items()})
      records = exchange.write_arrays(scratch, out, arrays)
    else:
      records = _recompute(config, glob, urls, round_, manifest, root, report, scratch, out,
                           credentials)
    want = manifest["arrays"]
    report["mismatches"] = sorted(
        n for n in set(want) | set(records)
        if n not in want or n not in records or want[n]["digest"] != records[n]["digest"]
        or want[n]["chunk_shape"] != records[n]["chunk_shape"])
    report["stored_bytes_verified"] = _check_stored(glob, prefix, manifest)
  finally:
    shutil.rmtree(scratch_root, ignore_errors=True)
  report["arrays"] = len(manifest["arrays"])
  report["identical"] = not report["mismatches"]
  return report


def _recompute(config, glob, urls, round_, manifest, root, report, scratch, out, credentials):
  """Checks round `round_`'s base round and every input it names, then merges exactly
  those inputs into `scratch` at `out`; returns the merged arrays' records."""
  f, extra = config.federation, manifest["extra"]
  base_prefix = exchange.global_prefix(round_ - 1)
  base = _read(glob, base_prefix, f"base global round {round_ - 1}")
  _verify(root, base, federation.COORDINATOR, f"base global round {round_ - 1}")
  base_digest = exchange.manifest_digest(base)
  named = extra.get("base_manifest_sha256")
  if named != base_digest:
    raise AuditError(f"global round {round_} names base manifest {str(named)[:16]}..., the "
                     f"committed round {round_ - 1} is {base_digest[:16]}...")
  report["base"] = {"round": round_ - 1, "manifest_sha256": base_digest}
  schema = exchange.update_schema(config, round_)
  inputs, tokens, recorded, updates = [], [], [], {}
  for rec in extra["inputs"]:
    site = rec["site"]
    if site not in urls or site == federation.GLOBAL:
      raise AuditError(f"global round {round_} names unknown site {site!r}")
    bucket = buckets.Bucket(urls[site], max_retries=int(f.storage_retries),
                            credentials=credentials)
    update = _read(bucket, exchange.update_prefix(round_), f"update of site {site}")
    digest = exchange.manifest_digest(update)
    if digest != rec["manifest_sha256"]:
      raise AuditError(f"global round {round_} names update {rec['manifest_sha256'][:16]}... "
                       f"of site {site}; its committed update is {digest[:16]}...")
    why = exchange.validate_update(update, config, site, round_, round_ - 1, schema, root)
    if why is not None:
      raise AuditError(f"update of site {site} for round {round_} would be refused: {why}")
    report["inputs"].append({
        "site": site, "bucket": bucket.url.split("?", 1)[0], "manifest_sha256": digest,
        "arrays_sha256": arrays_digest(update), "tokens": update["tokens"],
        "weight": rec["weight"],
        "signature": f"ok (key {update['signature']['key_id']})" if root else "unsigned"})
    inputs.append((bucket, exchange.update_prefix(round_), update))
    updates[site] = update
    tokens.append(update["tokens"])
    recorded.append(float(rec["weight"]))
  _check_dates(round_, base, manifest, updates,
               root.max_clock_skew_s if root is not None else 0.0)
  settings = extra.get("merge") or {}
  # The spec the round records, through the coordinator's own path (federation.merge_spec).
  spec = outer_config.RoundMergeSpec.from_config(
      extra["outer"], settings.get("robust"),
      weight_cap=settings.get("weight_cap_tokens") or federation.weight_cap(config),
      download=settings.get("download"),
      moment_sync_every=settings.get("moment_sync_every", 1))
  if spec.moment_sync_every > 1 and extra.get("moment_round") is not spec.moment_round(round_):
    raise AuditError(f"global round {round_} records moment_round="
                     f"{extra.get('moment_round')!r}; moment_sync_every="
                     f"{spec.moment_sync_every} makes it {spec.moment_round(round_)}")
  spec = spec.for_round(round_)  # Under moments synced every K rounds: this round's rule.
  cap = spec.weight_cap
  weights = spec.weights(tokens)
  if extra.get("contribution") is not None:  # Weights and refusals from the signed scores.
    named = extra["inputs"]
    try:
      weights = contribution.check_record(extra["contribution"], [i["site"] for i in named],
                                          [i["manifest_sha256"] for i in named], tokens, cap)
    except (ValueError, KeyError, TypeError) as e:
      raise AuditError(f"global round {round_}: contribution check: {e}") from None
    report["contribution"] = extra["contribution"]
  if [float(w) for w in weights] != recorded:
    raise AuditError(f"global round {round_} records weights {recorded}; the signed token "
                     f"counts {tokens} with cap {cap} give {[float(w) for w in weights]}")
  report["outer"], report["merge"] = extra["outer"], settings
  return merge_lib.merge_round(spec, glob, base_prefix, base, inputs, weights, scratch, out,
                               max_block_bytes=merge_lib.block_bytes(f.get("merge_block_mib")))


def format_report(report: dict[str, Any]) -> str:
  """One audited round as text: its provenance, every input, then the verdict."""
  r = report["round"]
  verdict = "BIT-IDENTICAL" if report["identical"] else f"DIFFERS in {report['mismatches']}"
  lines = [f"global round {r} of {report['federation']}: manifest "
           f"{report['manifest_sha256'][:16]}..., arrays {report['arrays_sha256'][:16]}..., "
           f"signature {report['signature']}"]
  if "base" in report:
    lines.append(f"  from global round {report['base']['round']} "
                 f"(manifest {report['base']['manifest_sha256'][:16]}...), outer "
                 f"{report['outer'].get('name')} lr {report['outer'].get('lr')}, merge "
                 f"{report['merge']}")
  for i in report["inputs"]:
    lines.append(f"  input {i['site']:>12}: update {i['manifest_sha256'][:16]}..., arrays "
                 f"{i['arrays_sha256'][:16]}..., {i['tokens']} tokens, weight "
                 f"{i['weight']:.4f}, signature {i['signature']}  [{i['bucket']}]")
  for s in report.get("contribution", {}).get("sites", []):
    lines.append(f"  contribution {s['site']:>12}: score {s['score']!r}"
                 f"{' (refused)' if s['refused'] else ''}")
  lines.append(f"  recomputed {report['arrays']} arrays: {verdict}; stored chunks verified "
               f"({report['stored_bytes_verified']} bytes)")
  return "\n".join(lines)


def audit_federation(config, workdir: str, rounds: Iterable[int] | None = None, *,
                     credentials: str | None = None, public_keys_dir: str | None = None,
                     echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
  """Audits global rounds `rounds` (None: every committed one) with `audit_round`.

  `public_keys_dir` first fills the parties' keys missing from the config's trust root
  (DIR/PARTY.pub; the config is changed). Each report goes to `echo` as text as soon as
  its round is audited, so the rounds before one that cannot be checked stay shown.
  Returns the reports; AuditError (or the trust or bucket error) when a round cannot be
  checked, or when there is no committed round to audit."""
  if public_keys_dir:
    trust.fill_public_keys(config, public_keys_dir, federation.party_names(config))
  if rounds is None:
    glob = buckets.Bucket(federation.bucket_urls(config, workdir)[federation.GLOBAL],
                          max_retries=int(config.federation.storage_retries),
                          credentials=credentials)
    rounds = exchange.committed_rounds(glob, "global")
    if not rounds:
      raise AuditError(f"{glob.url} has no committed global round")
    root = trust.TrustRoot.from_config(config) if config.federation.trust.require_signatures \
        else None
    below = retention.collected_below(glob, config, root)
    if below > 0:  # Its base and inputs are gone: the kept rounds after it are audited.
      if echo is not None:
        echo(f"global rounds 0..{below}: collected by retention (federation.retention."
             f"keep_rounds), not audited")
      rounds = [r for r in rounds if r > below]
  reports = []
  for r in rounds:
    reports.append(audit_round(config, workdir, r, credentials=credentials))
    if echo is not None:
      echo(format_report(reports[-1]))
  return reports


def verdict(reports: list[dict[str, Any]]) -> str:
  """The one-line outcome of `audit_federation`: all bit-identical, or which rounds differ."""
  bad = [r["round"] for r in reports if not r["identical"]]
  return f"audited {len(reports)} rounds: " + (
      "all bit-identical" if not bad else f"rounds {bad} differ")
