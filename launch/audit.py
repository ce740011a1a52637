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


def _print(report: dict) -> None:
  r = report["round"]
  verdict = "BIT-IDENTICAL" if report["identical"] else f"DIFFERS in {report['mismatches']}"
  print(f"global round {r} of {report['federation']}: manifest {report['manifest_sha256'][:16]}"
        f"..., arrays {report['arrays_sha256'][:16]}..., signature {report['signature']}")
  if "base" in report:
    print(f"  from global round {report['base']['round']} "
          f"(manifest {report['base']['manifest_sha256'][:16]}...), outer "
          f"{report['outer'].get('name')} lr {report['outer'].get('lr')}, merge "
          f"{report['merge']}")
  for i in report["inputs"]:
    print(f"  input {i['site']:>12}: update {i['manifest_sha256'][:16]}..., arrays "
          f"{i['arrays_sha256'][:16]}..., {i['tokens']} tokens, weight {i['weight']:.4f}, "
          f"signature {i['signature']}  [{i['bucket']}]")
  print(f"  recomputed {report['arrays']} arrays: {verdict}; stored chunks verified "
        f"({report['stored_bytes_verified']} bytes)")


def main(argv):
  del argv
  from tapestry_jax import audit, buckets, exchange, federation, trust

  quiet_library_logs()
  config, workdir = _CONFIG.value, _WORKDIR.value
  reports = []
  with exit_on_bad_input():
    if _PUBLIC_KEYS_DIR.value:
      trust.fill_public_keys(config, _PUBLIC_KEYS_DIR.value, federation.party_names(config))
    if _ROUND.value >= 0:
      rounds = [_ROUND.value]
    else:
      glob = buckets.Bucket(federation.bucket_urls(config, workdir)[federation.GLOBAL],
                            credentials=_CREDENTIALS.value)
      rounds = exchange.committed_rounds(glob, "global")
      if not rounds:
        raise exchange.ExchangeError(f"{glob.url} has no committed global round")
    for r in rounds:
      report = audit.audit_round(config, workdir, r, credentials=_CREDENTIALS.value)
      _print(report)
      reports.append(report)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(reports, f, indent=1)
  bad = [r["round"] for r in reports if not r["identical"]]
  print(f"audited {len(reports)} rounds: " + ("all bit-identical" if not bad
                                              else f"rounds {bad} differ"))
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
