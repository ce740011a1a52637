"""Run one sovereign site of a federation (a separate process; shares only the buckets).

  python -m launch.site --config=experiments/configs/federation.py:tiny --workdir=/tmp/fed \
      --site=latin

The site writes only to its own bucket (config.sites.NAME.bucket) and reads only the
coordinator's. Rerunning with the same --workdir resumes from the site's last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from launch.common import (define_party_flags, define_process_flags, exit_on_bad_input,
                           join_processes, parse_flags, quiet_library_logs)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Federation config, e.g. experiments/configs/federation.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Federation directory (default buckets live here).")
_SITE = flags.DEFINE_string("site", None, "This site's name (a key of config.sites).")
_PRIVATE_KEY, _CREDENTIALS = define_party_flags()
define_process_flags()
flags.mark_flags_as_required(["config", "workdir", "site"])


def main(argv):
  del argv
  from tapestry_jax import preemption, site

  group = join_processes()
  quiet_library_logs()
  logging.info("site %s: process %d of %d", _SITE.value, group.process_id, group.num_processes)
  try:
    with exit_on_bad_input():
      records = site.run_site(_CONFIG.value, _SITE.value, _WORKDIR.value,
                              private_key=_PRIVATE_KEY.value, credentials=_CREDENTIALS.value)
  except preemption.Preempted as e:
    print(f"site {_SITE.value}: {e}")
    return
  if records and group.primary:
    last = records[-1]
    print(f"site {_SITE.value}: done at global round {last['global_round']}, "
          f"eval loss {last['eval_loss']:.4f}, bits/byte {last['eval_bits_per_byte']:.4f}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
