"""Recompute committed global rounds from the signed inputs they name, and show provenance.

  python -m launch.audit --config=experiments/configs/federation.py:tiny --workdir=/tmp/fed \
      --round=12            # or --round=-1 for every committed round

For each round: the coordinator's signature, the base round and every site update it
names (digest, signature, tokens, weight), a recomputation of the merge from exactly
those inputs, and whether the result is bit-identical to what was published (chunk
digests equal). Exit status 0 if every audited round is identical, 1 if any differs,
2 for bad input (missing round, bad signature, unreadable bucket).
The trust root is the config's federation.trust.public_keys: pass the same overrides
the parties use, or --public_keys_dir=WORKDIR/keys after a launch.federate run.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from launch.common import exit_on_bad_input, parse_flags, quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Federation config, e.g. experiments/configs/federation.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Federation directory (default buckets live here).")
_ROUND = flags.DEFINE_integer("round", -1, "Global round to audit; -1 = every committed round.")
_CREDENTIALS = flags.DEFINE_string(
    "credentials", None, "The auditor's S3 credentials: 'env', a credentials file, or unset.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the reports as JSON here.")
_PUBLIC_KEYS_DIR = flags.DEFINE_string(
    "public_keys_dir", None, "Fill parties' public keys missing from the config from "
    "DIR/PARTY.pub (e.g. WORKDIR/keys of a launch.federate run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from tapestry_jax import audit

  quiet_library_logs()
  with exit_on_bad_input():
    reports = audit.audit_federation(
        _CONFIG.value, _WORKDIR.value, None if _ROUND.value < 0 else [_ROUND.value],
        credentials=_CREDENTIALS.value, public_keys_dir=_PUBLIC_KEYS_DIR.value, echo=print)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(reports, f, indent=1)
  print(audit.verdict(reports))
  sys.exit(0 if all(r["identical"] for r in reports) else 1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
