"""Trust: every party signs what it publishes; every reader verifies before it uses it.

Each party (every site, and the coordinator, party "global") has an Ed25519 key pair.
The federation config holds the public keys of all parties (`federation.trust.public_keys`,
the trust root); each party keeps its private key in a file of its own
(`python -m launch.keygen`).

A manifest (a site's update or a global round, see exchange.py) is signed over its
canonical JSON without the `signature` field: sorted keys, no whitespace, ASCII, no NaN.
The manifest binds the federation id, the round, the author, the global round it was
trained from, the token count and the BLAKE3 digest of every chunk of every array as
stored, so
a valid signature vouches for every byte a reader will read (readers check the chunks
against those digests as they read them). The signature is stored in the manifest:

    "signature": {"algorithm": "ed25519", "key_id": "<16 hex>", "value": "<base64>"}

`key_id` is the first 16 hex digits of the sha256 of the raw public key; it says which
key signed (a reader looks the author up in the trust root, never trusts the key id).

Every signature also stamps the manifest with `signed_at` (UTC, ISO-8601), inside the
signed body, so readers can bound how old a round may be (a frozen or replaying writer).

The trust root changes only by a trust-root update: a record signed by the federation's
root key (`federation.trust.root_key`, held offline by whoever governs the federation, not
by a running party) that rotates or revokes one party's key from a round on
(`key_update`, `TrustRoot.apply_updates`). Readers pick the key valid for the round they
verify, so rounds signed before a revocation still verify.

Cryptography is the `cryptography` package's; nothing here hand-rolls a primitive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import datetime
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ALGORITHM = "ed25519"
PUBLIC_PREFIX = "ed25519:"
# The author of trust-root updates: the holder of federation.trust.root_key.
ROOT_PARTY = "trust-root"
KEY_UPDATE = "key_update"
TIMESTAMP = "signed_at"
Clock = Callable[[], float]  # Unix seconds now (time.time; tests pass their own).


class TrustError(Exception):
  """A missing, malformed, unknown or invalid key or signature."""


# --------------------------------------------------------------------------- keys


def generate_private_key() -> ed25519.Ed25519PrivateKey:
  return ed25519.Ed25519PrivateKey.generate()


def _raw(public: ed25519.Ed25519PublicKey) -> bytes:
  return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> str:
  """'ed25519:<base64 of the 32 raw bytes>', the form the trust root holds."""
  if isinstance(key, ed25519.Ed25519PrivateKey):
    key = key.public_key()
  return PUBLIC_PREFIX + base64.b64encode(_raw(key)).decode()


def key_id(key: ed25519.Ed25519PublicKey) -> str:
  return hashlib.sha256(_raw(key)).hexdigest()[:16]


def parse_public_key(text: Any, *, what: str = "public key") -> ed25519.Ed25519PublicKey:
  """Parses 'ed25519:<base64>'; TrustError saying what is wrong otherwise."""
  if not isinstance(text, str) or not text.startswith(PUBLIC_PREFIX):
    raise TrustError(f"{what} {str(text)[:40]!r} is not of the form 'ed25519:<base64>' "
                     f"(made by `python -m launch.keygen`)")
  try:
    raw = base64.b64decode(text[len(PUBLIC_PREFIX):], validate=True)
  except (binascii.Error, ValueError):
    raise TrustError(f"{what} {text[:40]!r}: the part after 'ed25519:' is not base64") from None
  if len(raw) != 32:
    raise TrustError(f"{what} {text[:40]!r}: an Ed25519 public key has 32 bytes, got {len(raw)}")
  return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def write_private_key(path: str, key: ed25519.Ed25519PrivateKey, *,
                      overwrite: bool = False) -> None:
  """Writes `key` as PKCS#8 PEM readable only by its owner (mode 0600)."""
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
  try:
    fd = os.open(path, flags, 0o600)
  except FileExistsError:
    raise TrustError(f"private key {path} already exists; refusing to overwrite it "
                     f"(delete it first if you really mean to replace this party's key)") from None
  with os.fdopen(fd, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def load_private_key(path: str) -> ed25519.Ed25519PrivateKey:
  """Reads a PEM private key written by `write_private_key`; clear TrustError otherwise."""
  path = os.path.abspath(os.path.expanduser(path))
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise TrustError(f"private key {path} does not exist; create one with "
                     f"`python -m launch.keygen --party=NAME --out=DIR`") from None
  except OSError as e:
    raise TrustError(f"cannot read private key {path}: {e.strerror}") from None
  try:
    key = serialization.load_pem_private_key(data, password=None)
  except (ValueError, TypeError) as e:
    raise TrustError(f"{path} is not an unencrypted PEM private key ({e})") from None
  if not isinstance(key, ed25519.Ed25519PrivateKey):
    raise TrustError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
  return key


# --------------------------------------------------------------------------- time


def utc_text(t: float) -> str:
  """Unix seconds `t` as the ISO-8601 UTC text manifests carry ('2026-12-05T09:07:55.123Z')."""
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
      timespec="milliseconds").replace("+00:00", "Z")


def parse_utc(text: Any, *, what: str = "timestamp") -> float:
  """Unix seconds of an ISO-8601 UTC time ('2027-01-31T00:00:00Z'); TrustError otherwise."""
  bad = f"{what} {str(text)[:40]!r} is not an ISO-8601 UTC time such as '2027-01-31T00:00:00Z'"
  if not isinstance(text, str):
    raise TrustError(bad)
  try:
    t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
  except ValueError:
    raise TrustError(bad) from None
  if t.utcoffset() != datetime.timedelta(0):  # Naive, or another zone.
    raise TrustError(bad + " (give the zone: end it with 'Z')")
  return t.timestamp()


# --------------------------------------------------------------------------- signatures


def signed_bytes(manifest: Mapping) -> bytes:
  """The canonical JSON of `manifest` without its `signature`: what is signed."""
  body = {k: v for k, v in manifest.items() if k != "signature"}
  try:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()
  except (TypeError, ValueError) as e:
    raise TrustError(f"manifest is not plain JSON and cannot be signed ({e})") from None


def unstamped(manifest: Mapping) -> dict:
  """`manifest` without its signature and signed timestamp: what two signers of the same
  content (e.g. the processes of one site) agree on."""
  return {k: v for k, v in manifest.items() if k not in ("signature", TIMESTAMP)}


class Signer:
  """A party's private key, ready to sign its manifests; `clock` dates each signature."""

  def __init__(self, party: str, key: ed25519.Ed25519PrivateKey, clock: Clock = time.time):
    self.party = party
    self.key = key
    self.public_text = public_key_text(key)
    self.key_id = key_id(key.public_key())
    self.clock = clock

  @classmethod
  def from_file(cls, party: str, path: str) -> "Signer":
    return cls(party, load_private_key(path))

  def sign(self, manifest: Mapping) -> dict:
    """A copy of `manifest` stamped with `signed_at` (now, UTC) and signed; the author
    must be this party."""
    if manifest.get("author") != self.party:
      raise TrustError(f"party {self.party!r} may only sign its own manifests, not one "
                       f"authored by {manifest.get('author')!r}")
    out = {k: v for k, v in manifest.items() if k != "signature"}
    out[TIMESTAMP] = utc_text(self.clock())
    value = self.key.sign(signed_bytes(out))
    out["signature"] = {"algorithm": ALGORITHM, "key_id": self.key_id,
                        "value": base64.b64encode(value).decode()}
    return out


def _check_signature(manifest: Mapping, author: str, known: ed25519.Ed25519PublicKey,
                     what: str) -> None:
  """Checks `manifest`'s signature by `author` with `known`: TrustError if it is missing,
  by another key, or does not verify."""
  if manifest.get("author") != author:
    raise TrustError(f"{what} authored by {manifest.get('author')!r}, expected {author!r}")
  sig = manifest.get("signature")
  if not isinstance(sig, Mapping):
    raise TrustError(f"{what} is not signed")
  if sig.get("algorithm") != ALGORITHM:
    raise TrustError(f"{what} is signed with {sig.get('algorithm')!r}, not {ALGORITHM}")
  if sig.get("key_id") != key_id(known):
    raise TrustError(f"{what} is signed by unknown key {str(sig.get('key_id'))[:16]!r}, not "
                     f"{author!r}'s key {key_id(known)}")
  try:
    value = base64.b64decode(str(sig.get("value", "")), validate=True)
    known.verify(value, signed_bytes(manifest))
  except (binascii.Error, ValueError, InvalidSignature):
    raise TrustError(f"{what}: the signature does not verify (forged, or the manifest was "
                     f"changed after it was signed)") from None


class TrustRoot:
  """The public keys of a federation's parties: who may author what, from which round.

  It starts from the configured keys (valid from round 0) and changes only by trust-root
  updates signed with `root_key` (`apply_updates`). Nothing signed after `expires_at`
  (unix seconds; None = never) verifies. A `live` root (a running party's) also refuses
  everything once its `clock` passes `expires_at`, and manifests signed more than
  `max_clock_skew_s` in its future; an audit's root is not live, so that old rounds
  still verify after the trust root expired."""

  def __init__(self, public_keys: Mapping[str, str], *, root_key: str = "",
               federation: str | None = None, expires_at: float | None = None,
               max_clock_skew_s: float = 300.0, max_age_s: float = 0.0, live: bool = False,
               clock: Clock = time.time):
    self.keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for party, text in public_keys.items():
      if text:
        self.keys[party] = parse_public_key(text, what=f"public key of party {party!r}")
    self.root_key = (parse_public_key(root_key, what="federation.trust.root_key")
                     if root_key else None)
    self.federation = federation
    self.expires_at = expires_at
    self.max_clock_skew_s = float(max_clock_skew_s)
    self.max_age_s = float(max_age_s)  # Of a global round a site adopts (0: no bound).
    self.live = live
    self.clock = clock
    # Per party, its key changes in order: (from round, key or None = revoked, the
    # trust-root update that made it, 0 = the config).
    self.schedule: dict[str, list[tuple[int, ed25519.Ed25519PublicKey | None, int]]] = {
        p: [(0, k, 0)] for p, k in self.keys.items()}
    self.updates: list[dict] = []  # The trust-root updates applied, in order.

  @classmethod
  def from_config(cls, config, *, live: bool = False, clock: Clock = time.time) -> "TrustRoot":
    """The trust root of `config.federation.trust` (`live`: a running party's)."""
    t = config.federation.trust
    expires = str(t.get("expires_at", "") or "")
    seconds = {}
    for field, default in (("max_clock_skew_s", 300.0), ("max_global_age_s", 0.0)):
      v = t.get(field, default)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise TrustError(f"federation.trust.{field} must be seconds >= 0, got {v!r}")
      seconds[field] = float(v)
    return cls(dict(t.public_keys), root_key=str(t.get("root_key", "") or ""),
               federation=config.federation.id,
               expires_at=parse_utc(expires, what="federation.trust.expires_at")
               if expires else None,
               max_clock_skew_s=seconds["max_clock_skew_s"],
               max_age_s=seconds["max_global_age_s"], live=live, clock=clock)

  # ------------------------------------------------------------- keys by round

  def _entry(self, party: str, round_: int):
    entries = self.schedule.get(party)
    if entries is None:
      raise TrustError(f"party {party!r} has no key in the trust root; its manifests "
                       f"cannot be verified")
    out = entries[0]
    for e in entries:
      if e[0] <= round_:
        out = e  # The last change at or before the round (a later record wins a tie).
    return out

  def key_for(self, party: str, round_: int) -> ed25519.Ed25519PublicKey | None:
    """`party`'s key for round `round_` (None: revoked); TrustError for an unknown party."""
    return self._entry(party, round_)[1]

  def check_signer(self, signer: Signer) -> None:
    """TrustError unless `signer`'s key is one the trust root gives its party (for some
    round: `verify` checks that it is the one for the round signed)."""
    entries = self.schedule.get(signer.party)
    if entries is None:
      raise TrustError(f"the trust root (federation.trust.public_keys) has no key for party "
                       f"{signer.party!r}")
    raw = _raw(signer.key.public_key())
    if not any(k is not None and _raw(k) == raw for _, k, _ in entries):
      current = entries[-1][1]
      where = ("its public key in federation.trust.public_keys" if len(entries) == 1
               else "its current key in the trust root")
      raise TrustError(f"the private key given for party {signer.party!r} does not match "
                       f"{where} ({public_key_text(current) if current else 'revoked'}); "
                       f"this is another party's or an old key")

  # ------------------------------------------------------------- verification

  def verify(self, manifest: Mapping, author: str, round_: int | None = None) -> None:
    """Checks that `manifest` is authored by `author` and signed with `author`'s key for
    round `round_` (default: the manifest's round), and that its signed timestamp is
    before the trust root's expiry (and, live, not beyond the clock skew in the future).

    TrustError (saying which) for: another author, an unsigned manifest, an unknown party,
    a revoked key, a signature by another key (key id differs: an unknown key, or the
    party's key for other rounds), or a signature that does not verify (forged, or the
    manifest was altered after signing)."""
    self.check_live()
    if manifest.get("author") != author:
      raise TrustError(f"manifest authored by {manifest.get('author')!r}, expected {author!r}")
    if round_ is None:
      round_ = manifest.get("round")
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
      raise TrustError(f"manifest of {author!r} has no round number ({str(round_)[:20]!r}) "
                       f"to pick its key by")
    from_round, known, seq = self._entry(author, round_)
    source = ("federation.trust.public_keys" if seq == 0
              else f"from round {from_round} on, by trust-root update #{seq}")
    if known is None:
      raise TrustError(f"party {author!r}'s key is revoked from round {from_round} on "
                       f"(trust-root update #{seq}): its manifest for round {round_} is "
                       f"refused")
    sig = manifest.get("signature")
    kid = str(sig.get("key_id"))[:16] if isinstance(sig, Mapping) else None
    if kid is not None and kid != key_id(known) and any(
        k is not None and key_id(k) == kid for _, k, _ in self.schedule[author]):
      raise TrustError(f"manifest of {author!r} for round {round_} is signed with its key "
                       f"{kid}, which is not its key for that round ({key_id(known)}, "
                       f"{source}): a rotated key")
    _check_signature(manifest, author, known, f"manifest of {author!r}")
    self._check_time(manifest, f"manifest of {author!r}")

  def _check_time(self, manifest: Mapping, what: str) -> None:
    text = manifest.get(TIMESTAMP)
    if text is None:
      return  # Signed before manifests carried timestamps.
    t = parse_utc(text, what=f"{what}: signed timestamp")
    if self.expires_at is not None and t > self.expires_at:
      raise TrustError(f"{what} was signed at {text}, after the trust root expired at "
                       f"{utc_text(self.expires_at)} (federation.trust.expires_at)")
    if self.live:
      ahead = t - self.clock()
      if ahead > self.max_clock_skew_s:
        raise TrustError(f"{what} is signed at {text}, {ahead:.0f} s in this party's future: "
                         f"more than federation.trust.max_clock_skew_s="
                         f"{self.max_clock_skew_s:g} (a wrong clock, or a forged date?)")

  def check_live(self) -> None:
    """TrustError, for a live root, once its clock has passed the trust root's expiry."""
    if self.live and self.expires_at is not None and self.clock() > self.expires_at:
      raise TrustError(f"the trust root expired at {utc_text(self.expires_at)} "
                       f"(federation.trust.expires_at): nothing is verified under it any "
                       f"more; every party needs a renewed trust root (a later expires_at)")

  def check_age(self, manifest: Mapping, what: str) -> None:
    """TrustError if `manifest` (verified) was signed more than `max_age_s` (0 = no
    bound) plus the clock skew ago: a frozen or replaying writer."""
    max_age_s = self.max_age_s
    if not max_age_s > 0:
      return
    text = manifest.get(TIMESTAMP)
    if text is None:
      raise TrustError(f"{what} carries no signed timestamp; federation.trust.max_global_age_s"
                       f"={max_age_s:g} needs one (signed by an older version?)")
    age = self.clock() - parse_utc(text, what=f"{what}: signed timestamp")
    if age > max_age_s + self.max_clock_skew_s:
      raise TrustError(f"{what} was signed at {text}, {age:.0f} s ago: older than "
                       f"federation.trust.max_global_age_s={max_age_s:g} (+ max_clock_skew_s="
                       f"{self.max_clock_skew_s:g}); a frozen or replaying coordinator? "
                       f"refusing it")

  # ------------------------------------------------------------- trust-root updates

  def apply_updates(self, records: list[Mapping]) -> int:
    """Applies the trust-root log `records` (every update so far, in order): those past
    the ones already applied are checked (`key_update`'s form, signed by the root key,
    numbered next, for this federation, naming the key they replace) and applied.
    Returns how many were new. TrustError for a log that lost or changed a record."""
    if len(records) < len(self.updates):
      raise TrustError(f"the trust-root log holds {len(records)} updates, fewer than the "
                       f"{len(self.updates)} already applied (were records removed?)")
    for old, rec in zip(self.updates, records):
      if signed_bytes(old) != signed_bytes(rec) or old.get("signature") != rec.get("signature"):
        raise TrustError(f"trust-root update #{old['seq']} changed after it was applied")
    new = records[len(self.updates):]
    for rec in new:
      self._apply(rec)
    return len(new)

  def _apply(self, rec: Mapping) -> None:
    seq = len(self.updates) + 1
    what = f"trust-root update #{seq}"
    if not isinstance(rec, Mapping) or rec.get("kind") != KEY_UPDATE:
      raise TrustError(f"{what} is not a {KEY_UPDATE!r} record")
    if rec.get("seq") != seq:
      raise TrustError(f"{what} says it is #{str(rec.get('seq'))[:20]} (a gap or a reordered "
                       f"log)")
    if self.federation is not None and rec.get("federation") != self.federation:
      raise TrustError(f"{what} is for federation {str(rec.get('federation'))[:40]!r}, not "
                       f"{self.federation!r}")
    if self.root_key is None:
      raise TrustError(f"{what}: federation.trust.root_key is not set, so no trust-root "
                       f"update can be verified; set it to the federation's root public key")
    _check_signature(rec, ROOT_PARTY, self.root_key, what)
    self._check_time(rec, what)
    party, from_round = rec.get("party"), rec.get("from_round")
    if party not in self.schedule:
      raise TrustError(f"{what}: party {str(party)[:40]!r} is not in the trust root (parties "
                       f"come from federation.trust.public_keys)")
    if isinstance(from_round, bool) or not isinstance(from_round, int) or from_round < 0:
      raise TrustError(f"{what}: from_round {str(from_round)[:20]!r} is not a round number")
    entries = self.schedule[party]
    last_round, last_key, _ = entries[-1]
    if from_round < last_round:
      raise TrustError(f"{what}: from round {from_round} is before round {last_round}, from "
                       f"which {party!r}'s last key change holds (keys change forward only)")
    if rec.get("old_key") != (public_key_text(last_key) if last_key else None):
      raise TrustError(f"{what}: names {str(rec.get('old_key'))[:60]!r} as {party!r}'s key, "
                       f"which is not its current key")
    new_key = rec.get("new_key")
    new = None if new_key is None else parse_public_key(new_key, what=f"{what}: new_key")
    if new is not None and any(k is not None and _raw(k) == _raw(new) for _, k, _ in entries):
      raise TrustError(f"{what}: {party!r} already had key {key_id(new)}; a rotated or "
                       f"revoked key does not come back")
    entries.append((from_round, new, seq))
    self.updates.append(dict(rec))


def key_update(signer: Signer, root: TrustRoot, party: str, from_round: int,
               new_key: str | None) -> dict:
  """A trust-root update: from round `from_round` on, `party`'s key is `new_key`
  ('ed25519:...'), or with None it is revoked. Signed by `signer`, the holder of the root
  key (party ROOT_PARTY); numbered after the updates `root` has applied and naming the
  key it replaces, so that it applies only on top of that log."""
  if signer.party != ROOT_PARTY:
    raise TrustError(f"trust-root updates are signed by party {ROOT_PARTY!r} (the holder of "
                     f"federation.trust.root_key), not {signer.party!r}")
  if root.root_key is not None and _raw(root.root_key) != _raw(signer.key.public_key()):
    raise TrustError("this key is not the federation's root key (federation.trust.root_key)")
  if new_key is not None:
    parse_public_key(new_key, what="new_key")
  last = root.schedule.get(party, [(0, None, 0)])[-1][1]
  return signer.sign({
      "kind": KEY_UPDATE, "federation": root.federation, "seq": len(root.updates) + 1,
      "author": ROOT_PARTY, "party": party, "from_round": int(from_round),
      "old_key": public_key_text(last) if last else None, "new_key": new_key})


# --------------------------------------------------------------------------- setup


def keygen(directory: str, party: str, *, overwrite: bool = False) -> tuple[str, str]:
  """Creates `party`'s key pair in `directory`: '<party>.key' (private, 0600) and
  '<party>.pub' (the public key text). Returns (private key path, public key text)."""
  key = generate_private_key()
  path = os.path.join(directory, f"{party}.key")
  write_private_key(path, key, overwrite=overwrite)
  text = public_key_text(key)
  with open(os.path.join(directory, f"{party}.pub"), "w") as f:
    f.write(text + "\n")
  return path, text


def ensure_local_keys(config, directory: str, parties) -> dict[str, str]:
  """For a whole federation run on one machine (launch.federate, tests): gives every
  party in `parties` a key in `directory` (reusing existing ones, so a rerun resumes),
  fills `config.federation.trust.public_keys` with their public keys and returns
  party -> private key path. Refuses to overwrite public keys already configured."""
  keys = config.federation.trust.public_keys
  paths = {}
  for party in parties:
    path = os.path.join(directory, f"{party}.key")
    if os.path.exists(path):
      text = public_key_text(load_private_key(path))
    else:
      path, text = keygen(directory, party)
    configured = keys.get(party, "")
    if configured and configured != text:
      raise TrustError(f"federation.trust.public_keys.{party} is set and does not match the "
                       f"key in {path}; remove one of them")
    with keys.unlocked():
      keys[party] = text
    paths[party] = path
  return paths



def fill_public_keys(config, directory: str, parties) -> None:
  """Sets each party's missing `federation.trust.public_keys` entry from
  `directory/PARTY.pub` (as written by `keygen`); TrustError if a file is missing."""
  keys = config.federation.trust.public_keys
  for party in parties:
    if keys.get(party, ""):
      continue
    path = os.path.join(directory, f"{party}.pub")
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      raise TrustError(f"no public key for party {party!r}: {path} cannot be read") from None
    parse_public_key(text, what=f"public key in {path}")
    with keys.unlocked():
      keys[party] = text
