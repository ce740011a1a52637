"""Run a whole federation on this machine and compare it with each site alone.

  python -m launch.federate --config=experiments/configs/federation.py:tiny --workdir=/tmp/fed
  python -m launch.federate --config=experiments/configs/federation.py:tiny --workdir=/tmp/fed \
      --mode=simulate      # all sites in this one process (fast ablations)

--mode=processes (default) starts the coordinator and one process per site, sharing only
the buckets (exactly what separate machines would run: see launch/coordinator.py and
launch/site.py). Then, unless config.federation.compare_alone is False, every site is
trained alone with the same local compute, and a table compares the global model's
held-out loss and bits per byte on each site's data with the site's own model, next to
the bytes each site sent and received. WORKDIR/summary.json has per-round records.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from launch.common import exit_on_bad_input, parse_flags, quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Federation config, e.g. experiments/configs/federation.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Federation directory: buckets, logs, summary.")
_MODE = flags.DEFINE_enum("mode", "processes", ["processes", "simulate"],
                          "Separate processes sharing buckets, or one in-process simulation.")
_CREDENTIALS_DIR = flags.DEFINE_string(
    "credentials_dir", None, "For buckets on S3: a directory with one credentials file "
    "per party, PARTY.aws-credentials (the coordinator's party is 'coordinator'); each "
    "process is given only its own. Unset: every process uses TensorStore's default chain.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from tapestry_jax import orchestrate, report

  quiet_library_logs()
  with exit_on_bad_input():
    summary, path = orchestrate.run_federation(
        _CONFIG.value, _WORKDIR.value, mode=_MODE.value, credentials_dir=_CREDENTIALS_DIR.value,
        config_args=orchestrate.config_args_from(sys.argv[1:]), samples=True)
  print(report.table(summary))
  print(f"wrote {path} and the plots {os.path.dirname(path)}/*.png")
  print("one sample per site from the global model (prompt | continuation; temperature 0.7, "
        "top-k 20):")
  for name, s in summary["samples"].items():
    print(f"  {name}: {s['prompt']!r} | {s['continuation']!r}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
