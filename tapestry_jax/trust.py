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

Cryptography is the `cryptography` package's; nothing here hand-rolls a primitive.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ALGORITHM = "ed25519"
PUBLIC_PREFIX = "ed25519:"


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


# --------------------------------------------------------------------------- signatures


def signed_bytes(manifest: Mapping) -> bytes:
  """The canonical JSON of `manifest` without its `signature`: what is signed."""
  body = {k: v for k, v in manifest.items() if k != "signature"}
  try:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()
  except (TypeError, ValueError) as e:
    raise TrustError(f"manifest is not plain JSON and cannot be signed ({e})") from None


class Signer:
  """A party's private key, ready to sign its manifests."""

  def __init__(self, party: str, key: ed25519.Ed25519PrivateKey):
    self.party = party
    self.key = key
    self.public_text = public_key_text(key)
    self.key_id = key_id(key.public_key())

  @classmethod
  def from_file(cls, party: str, path: str) -> "Signer":
    return cls(party, load_private_key(path))

  def sign(self, manifest: Mapping) -> dict:
    """A copy of `manifest` with its signature; the author must be this party."""
    if manifest.get("author") != self.party:
      raise TrustError(f"party {self.party!r} may only sign its own manifests, not one "
                       f"authored by {manifest.get('author')!r}")
    value = self.key.sign(signed_bytes(manifest))
    out = {k: v for k, v in manifest.items() if k != "signature"}
    out["signature"] = {"algorithm": ALGORITHM, "key_id": self.key_id,
                        "value": base64.b64encode(value).decode()}
    return out


class TrustRoot:
  """The public keys of a federation's parties: who may author what."""

  def __init__(self, public_keys: Mapping[str, str]):
    self.keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for party, text in public_keys.items():
      if text:
        self.keys[party] = parse_public_key(text, what=f"public key of party {party!r}")

  @classmethod
  def from_config(cls, config) -> "TrustRoot":
    return cls(dict(config.federation.trust.public_keys))

  def check_signer(self, signer: Signer) -> None:
    """TrustError unless `signer`'s key is the one the trust root has for its party."""
    known = self.keys.get(signer.party)
    if known is None:
      raise TrustError(f"the trust root (federation.trust.public_keys) has no key for party "
                       f"{signer.party!r}")
    if _raw(known) != _raw(signer.key.public_key()):
      raise TrustError(f"the private key given for party {signer.party!r} does not match its "
                       f"public key in federation.trust.public_keys ({public_key_text(known)}); "
                       f"this is another party's or an old key")

  def verify(self, manifest: Mapping, author: str) -> None:
    """Checks that `manifest` is authored by `author` and signed with `author`'s key.

    TrustError (saying which) for: another author, an unsigned manifest, an unknown party,
    a signature by another key (key id differs), or a signature that does not verify
    (forged, or the manifest was altered after signing)."""
    if manifest.get("author") != author:
      raise TrustError(f"manifest authored by {manifest.get('author')!r}, expected {author!r}")
    sig = manifest.get("signature")
    if not isinstance(sig, Mapping):
      raise TrustError(f"manifest of {author!r} is not signed")
    if sig.get("algorithm") != ALGORITHM:
      raise TrustError(f"manifest of {author!r} is signed with {sig.get('algorithm')!r}, "
                       f"not {ALGORITHM}")
    known = self.keys.get(author)
    if known is None:
      raise TrustError(f"party {author!r} has no key in the trust root; its manifests "
                       f"cannot be verified")
    if sig.get("key_id") != key_id(known):
      raise TrustError(f"manifest of {author!r} is signed by unknown key "
                       f"{str(sig.get('key_id'))[:16]!r}, not {author!r}'s key {key_id(known)}")
    try:
      value = base64.b64decode(str(sig.get("value", "")), validate=True)
      known.verify(value, signed_bytes(manifest))
    except (binascii.Error, ValueError, InvalidSignature):
      raise TrustError(f"manifest of {author!r}: the signature does not verify (forged, or "
                       f"the manifest was changed after it was signed)") from None


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
