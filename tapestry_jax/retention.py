"""Retention: garbage collection of old rounds that no party can still need.

Opt-in (`federation.retention.keep_rounds` = K > 0; 0 keeps everything). Each party
deletes only from the bucket it owns:

  site         after each checkpoint, writes a signed resume marker (`RESUME`) in its own
               bucket: the base round of its newest checkpoint known to be durable, the
               oldest global round it can still read (it never reads one older: rollback
               is refused, and a restart reads its checkpoint's round or a newer one).
               It deletes its own update rounds at or below both the coordinator's
               floor and its own marker.
  coordinator  after each round, reads every site's marker and keeps every global round
               >= floor = min(LATEST - K + 1, every site's marker); a missing or
               unverifiable marker keeps everything. It writes the floor, signed, to the
               global bucket (`RETENTION`), then deletes the rounds below it (COMMIT
               first, so a reader sees "not committed", never a torn round), and the
               uncommitted attempts of committed rounds (those can never commit).

Nothing above LATEST (a round in flight) is ever touched. An audit of a round whose
base or inputs were collected reports it as collected (`collected_below`).
"""

from __future__ import annotations

import json

from absl import logging

from tapestry_jax import buckets
from tapestry_jax import exchange
from tapestry_jax import federation
from tapestry_jax import trust
from tapestry_jax.validate import ConfigError

RESUME = "RESUME"  # In a site's bucket: the oldest global round the site may still read.
RETENTION = "RETENTION"  # In the global bucket: rounds below its floor are collected.
_FORMAT = 1


def keep_rounds(config) -> int:
  """`federation.retention.keep_rounds` (0 = off), checked: an integer >= 0."""
  settings = config.federation.get("retention")
  keep = 0 if settings is None else settings.get("keep_rounds", 0)
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
    raise ConfigError(f"federation.retention.keep_rounds={keep!r} must be an integer >= 0 "
                      f"(0 = keep every round; K = the last K global rounds and every round "
                      f"a site may still resume from)")
  return keep


def floor(latest: int, keep: int, markers: dict[str, int | None]) -> int:
  """The oldest global round to keep: the last `keep` rounds up to `latest`, and every
  round at or above each site's resume marker; a site without one (None) keeps all."""
  if keep <= 0 or any(m is None for m in markers.values()):
    return 0
  return max(0, min([latest - keep + 1, *markers.values()]))


def collectable(committed: list[int], latest: int, keep: int,
                markers: dict[str, int | None]) -> list[int]:
  """The committed global rounds the policy removes (below `floor`)."""
  below = floor(latest, keep, markers)
  return [r for r in committed if r < below]


# --------------------------------------------------------------------------- records


def _record(config, kind: str, author: str, round_: int, signer: trust.Signer | None) -> bytes:
  rec = {"format": _FORMAT, "kind": kind, "federation": config.federation.id,
         "author": author, "round": int(round_)}
  if signer is not None:
    rec = signer.sign(rec)
  return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def _read_record(bucket: buckets.Bucket, key: str, config, kind: str, author: str,
                 root: trust.TrustRoot | None) -> int | None:
  """The round a `kind` record by `author` names; None (logged) if it is missing, not
  such a record, or its signature does not verify."""
  data = bucket.read(key)
  if data is None:
    return None
  try:
    rec = json.loads(data)
    if root is not None:
      root.verify(rec, author)
    ok = (rec.get("format") == _FORMAT and rec.get("kind") == kind
          and rec.get("federation") == config.federation.id and rec.get("author") == author
          and isinstance(rec.get("round"), int) and not isinstance(rec["round"], bool)
          and rec["round"] >= 0)
  except (ValueError, AttributeError, trust.TrustError) as e:
    logging.warning("retention: %s/%s is not a valid %s record of %s (%s); ignoring it",
                    bucket.url, key, kind, author, e)
    return None
  if not ok:
    logging.warning("retention: %s/%s is not a %s record of %s in federation %r; ignoring it",
                    bucket.url, key, kind, author, config.federation.id)
    return None
  return rec["round"]


def write_resume(own: buckets.Bucket, config, site: str, round_: int,
                 signer: trust.Signer | None) -> None:
  """Site: marks global round `round_` as the oldest it may still read (signed)."""
  own.write(RESUME, _record(config, "resume", site, max(0, round_), signer))


def read_resume(bucket: buckets.Bucket, config, site: str,
                root: trust.TrustRoot | None) -> int | None:
  """Site `site`'s resume marker, verified; None if it has none that verifies."""
  return _read_record(bucket, RESUME, config, "resume", site, root)


def collected_below(glob: buckets.Bucket, config, root: trust.TrustRoot | None) -> int:
  """The coordinator's signed retention floor: global rounds below it are (being)
  removed; 0 when nothing was."""
  return _read_record(glob, RETENTION, config, "retention", federation.COORDINATOR,
                      root) or 0


# --------------------------------------------------------------------------- collectors


def _remove_round(bucket: buckets.Bucket, prefix: str) -> None:
  """COMMIT first (the round is then not committed to any reader), then the rest."""
  bucket.delete(f"{prefix}/{exchange.COMMIT}")
  bucket.delete_prefix(prefix + "/")


def _remove_attempts(bucket: buckets.Bucket, prefix: str) -> list[str]:
  """The attempts of committed round `prefix` its COMMIT does not name (never committable)."""
  gone = exchange.uncommitted_attempts(bucket, prefix)
  for a in gone:
    bucket.delete_prefix(f"{prefix}/{a}/")
  return gone


def collect_global(glob: buckets.Bucket, sites: dict[str, buckets.Bucket], config,
                   root: trust.TrustRoot | None, signer: trust.Signer | None) -> dict:
  """Coordinator: removes the global rounds below the floor and the uncommitted attempts
  of the rounds it keeps up to LATEST. Returns {floor, rounds, attempts} removed."""
  keep = keep_rounds(config)
  latest = exchange.read_latest(glob)
  if keep == 0 or latest is None:
    return {"floor": 0, "rounds": [], "attempts": 0}
  markers = {}
  for n, b in sites.items():
    try:
      markers[n] = read_resume(b, config, n, root)
    except buckets.BucketError as e:  # Unreachable: it may still need anything.
      logging.warning("retention: site %s's marker is unreadable (%s); keeping every round", n, e)
      markers[n] = None
  below = floor(latest, keep, markers)  # Today's markers decide what goes.
  committed = exchange.committed_rounds(glob, "global")
  gone = [r for r in committed if r < below]
  said = collected_below(glob, config, root)
  if below > said:  # Said before it is done, so an audit can tell collected from missing.
    glob.write(RETENTION, _record(config, "retention", federation.COORDINATOR, below, signer))
  for r in gone:
    _remove_round(glob, exchange.global_prefix(r))
  attempts = sum(len(_remove_attempts(glob, exchange.global_prefix(r)))
                 for r in committed if below <= r <= latest)
  if gone or attempts:
    logging.info("retention: removed global rounds %s and %d uncommitted attempts (keeping "
                 "rounds >= %d; site markers %s)", gone, attempts, below, markers)
  return {"floor": below, "rounds": gone, "attempts": attempts}


def collect_updates(own: buckets.Bucket, glob: buckets.Bucket, config, site: str,
                    resume: int, root: trust.TrustRoot | None) -> dict:
  """Site: removes its own update rounds at or below both the coordinator's floor (their
  global rounds can no longer be recomputed) and its own marker `resume` (it never
  reads them again), and the uncommitted attempts of the committed ones it keeps (the
  site is its bucket's only writer: an attempt under a committed round never commits)."""
  if keep_rounds(config) == 0:
    return {"rounds": [], "attempts": 0}
  upto = min(collected_below(glob, config, root), resume)
  committed = exchange.committed_rounds(own, "update")
  gone = [r for r in committed if r <= upto]
  for r in gone:
    _remove_round(own, exchange.update_prefix(r))
  attempts = sum(len(_remove_attempts(own, exchange.update_prefix(r)))
                 for r in committed if r > upto)
  if gone or attempts:
    logging.info("retention: site %s removed its update rounds %s and %d uncommitted "
                 "attempts", site, gone, attempts)
  return {"rounds": gone, "attempts": attempts}
