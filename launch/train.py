"""Train a language model at one site.

  python -m launch.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm_tiny
  python -m launch.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm_fr \
      --config.data.source=text_files --config.data.paths=data_pipelines/corpora/debref/fr.txt.xz

Rerunning with the same --workdir resumes from its latest checkpoint. A site of many
processes runs this same command on every process (README, "A site of many processes"):

  python -m launch.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/mp \
      --config.data.shards=8 --coordinator_address=127.0.0.1:12355 --num_processes=2 \
      --process_id=0   # and --process_id=1 on the other process
"""

from absl import app, flags, logging
from ml_collections import config_flags

from launch.common import (define_process_flags, exit_on_bad_input, join_processes,
                           parse_flags, quiet_library_logs)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/configs/lm.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Imported here so --help stays fast and flag errors come before JAX starts.
  import jax
  from tapestry_jax import loop

  join_processes()
  quiet_library_logs()
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  with exit_on_bad_input():
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get("preempted"):
    print(f"preempted at step {result['step']}: checkpoint saved, rerun the same command "
          f"to resume")
    return
  ev = result.get("eval", {})
  print(f"done: step {result['step']}, eval loss {ev.get('eval_loss', float('nan')):.4f}, "
        f"bits/byte {ev.get('eval_bits_per_byte', float('nan')):.4f}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
