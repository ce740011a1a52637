"""Create a party's Ed25519 key pair for signing its updates (or global rounds).

  python -m launch.keygen --party=fr --out=~/tapestry-keys
  # -> ~/tapestry-keys/fr.key (private, mode 0600: stays with this party)
  #    ~/tapestry-keys/fr.pub (public: send it to whoever maintains the federation config)

The printed line is the trust-root entry for the federation config:
  --config.federation.trust.public_keys.fr=ed25519:...
The coordinator's party name is "coordinator". An existing key is never overwritten.
"""

from absl import app, flags

from launch.common import exit_on_bad_input, parse_flags

_PARTY = flags.DEFINE_string("party", None, "Party name: a site name, or 'coordinator'.")
_OUT = flags.DEFINE_string("out", None, "Directory for PARTY.key and PARTY.pub.")
flags.mark_flags_as_required(["party", "out"])


def main(argv):
  del argv
  import os

  from tapestry_jax import trust

  with exit_on_bad_input():
    if not _PARTY.value or "/" in _PARTY.value or _PARTY.value.startswith("."):
      raise ValueError(f"--party={_PARTY.value!r} must be a plain name")
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    path, text = trust.keygen(out, _PARTY.value)
  print(f"private key: {path} (keep it with party {_PARTY.value}; never share it)")
  print(f"public key:  {os.path.join(out, _PARTY.value + '.pub')}")
  print(f"--config.federation.trust.public_keys.{_PARTY.value}={text}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
