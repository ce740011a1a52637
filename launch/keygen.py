"""Create a party's Ed25519 key pair for signing its updates (or global rounds); or, with
the federation's root key, rotate or revoke a party's key from a round on.

  python -m launch.keygen --party=fr --out=~/tapestry-keys
  # -> ~/tapestry-keys/fr.key (private, mode 0600: stays with this party)
  #    ~/tapestry-keys/fr.pub (public: send it to whoever maintains the federation config)

The printed line is the trust-root entry for the federation config:
  --config.federation.trust.public_keys.fr=ed25519:...
The coordinator's party name is "coordinator"; the federation's root key (party
"trust-root", kept offline) goes in --config.federation.trust.root_key. An existing key
is never overwritten.

A trust-root update, signed with the root key and published in the global bucket (with
credentials that may write it, e.g. the coordinator operator's; the record is signed, so
whoever writes it cannot change it):

  python -m launch.keygen --change_key=fr --from_round=12 --new_key=~/fr2.pub \
      --root_key=~/root/trust-root.key --config=experiments/configs/federation.py:debref \
      --workdir=/srv/fed --credentials=env   # --new_key=revoke: no key from round 12 on
"""

from absl import app, flags
from ml_collections import config_flags

from launch.common import exit_on_bad_input, parse_flags
from tapestry_jax.validate import ConfigError

_PARTY = flags.DEFINE_string("party", None, "Party name: a site name, 'coordinator', or "
                             "'trust-root' (the federation's root key).")
_OUT = flags.DEFINE_string("out", None, "Directory for PARTY.key and PARTY.pub.")
_CHANGE = flags.DEFINE_string("change_key", None, "Party whose key a trust-root update "
                              "rotates or revokes.")
_FROM_ROUND = flags.DEFINE_integer("from_round", None, "First round the change holds for.")
_NEW_KEY = flags.DEFINE_string("new_key", None, "The party's new public key: 'ed25519:...', "
                               "a .pub file, or 'revoke'.")
_ROOT_KEY = flags.DEFINE_string("root_key", None, "The federation's root private key file.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Federation config (with "
                                          "--change_key).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Federation directory (with --change_key).")
_CREDENTIALS = flags.DEFINE_string("credentials", None, "S3 credentials that may write the "
                                   "global bucket: 'env', a file, or unset.")


def _change_key():
  """Publishes the trust-root update the flags describe; prints it."""
  import json
  import os

  from tapestry_jax import buckets
  from tapestry_jax import exchange
  from tapestry_jax import federation
  from tapestry_jax import trust

  missing = [f"--{n}" for n, v in (("from_round", _FROM_ROUND.value), ("new_key", _NEW_KEY.value),
                                   ("root_key", _ROOT_KEY.value), ("config", _CONFIG.value),
                                   ("workdir", _WORKDIR.value)) if v is None]
  if missing:
    raise ConfigError(f"--change_key needs {', '.join(missing)}")
  new_key = _NEW_KEY.value
  if new_key == "revoke":
    new_key = None
  elif not new_key.startswith(trust.PUBLIC_PREFIX):
    with open(os.path.expanduser(new_key)) as f:
      new_key = f.read().strip()
  config = _CONFIG.value
  glob = buckets.Bucket(federation.bucket_urls(config, _WORKDIR.value)[federation.GLOBAL],
                        credentials=_CREDENTIALS.value)
  signer = trust.Signer.from_file(trust.ROOT_PARTY, _ROOT_KEY.value)
  record = exchange.change_key(glob, config, signer, _CHANGE.value, _FROM_ROUND.value, new_key)
  print(f"published trust-root update #{record['seq']} in {glob.url}: party "
        f"{record['party']!r} from round {record['from_round']} on: "
        f"{record['new_key'] or 'revoked'}")
  print(json.dumps(record, sort_keys=True))


def main(argv):
  del argv
  import os

  from tapestry_jax import trust

  with exit_on_bad_input():
    if _CHANGE.value:
      _change_key()
      return
    if not _PARTY.value or not _OUT.value:
      raise ConfigError("give --party and --out (a new key pair), or --change_key")
    if "/" in _PARTY.value or _PARTY.value.startswith("."):
      raise ConfigError(f"--party={_PARTY.value!r} must be a plain name")
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    path, text = trust.keygen(out, _PARTY.value)
  print(f"private key: {path} (keep it with party {_PARTY.value}; never share it)")
  print(f"public key:  {os.path.join(out, _PARTY.value + '.pub')}")
  field = ("root_key" if _PARTY.value == trust.ROOT_PARTY
           else f"public_keys.{_PARTY.value}")
  print(f"--config.federation.trust.{field}={text}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
