"""Run a federation's coordinator (a separate process; shares only the buckets).

  python -m launch.coordinator --config=experiments/configs/federation.py:tiny --workdir=/tmp/fed

Reads committed site updates, merges them with the outer optimizer and publishes each
global round to the global bucket (config.federation.global_bucket). Rerunning resumes
after the last committed round. Run as several processes (--num_processes, or under
SLURM/Kubernetes) to split every merge across them.
"""

from absl import app, flags
from ml_collections import config_flags

from launch.common import (define_party_flags, define_process_flags, exit_on_bad_input,
                           join_processes, parse_flags, quiet_library_logs)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Federation config, e.g. experiments/configs/federation.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Federation directory (default buckets live here).")
_PRIVATE_KEY, _CREDENTIALS = define_party_flags()
define_process_flags()  # Several processes: each is a merge worker; process 0 leads.
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from tapestry_jax import coordinator

  group = join_processes()
  quiet_library_logs()
  with exit_on_bad_input():
    records = coordinator.Coordinator(
        _CONFIG.value, _WORKDIR.value, private_key=_PRIVATE_KEY.value,
        credentials=_CREDENTIALS.value).run()
  if group.primary:
    print(f"coordinator: published {len(records)} rounds")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
