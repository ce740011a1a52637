"""Run an ablation sweep in simulation and tabulate it.

  python -m launch.sweep --config=experiments/configs/federation.py:tiny \
      --sweep=experiments/sweeps/inner_steps.py --workdir=/tmp/sweep_h

Each run of the sweep file's `get_sweep()` is simulated (all sites in this process) and
compared with its sites trained alone (and, with --data_parallel, with data parallelism;
both cached by recipe, see --reference_cache); rows go to WORKDIR/sweep.jsonl and a table.
"""

import importlib.util

from absl import app, flags
from ml_collections import config_flags

from launch.common import exit_on_bad_input, parse_flags, quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Federation config, e.g. experiments/configs/federation.py:tiny.",
    lock_config=True)
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file with get_sweep().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and sweep.jsonl.")
_ALONE = flags.DEFINE_bool("alone", True, "Also train each site alone for comparison.")
_DP = flags.DEFINE_bool("data_parallel", False, "Also train data parallelism over the union "
                        "of the sites' data (same tokens) for comparison.")
_CACHE = flags.DEFINE_string(
    "reference_cache", None, "Directory caching the references by their exact recipe "
    "(tapestry_jax.references): runs that differ only in federation settings share them; "
    "default $XDG_CACHE_HOME/tapestry_jax/references; '' = compute them for every run.")
_RUNS = flags.DEFINE_list("runs", [], "Only these runs of the sweep, by name (default: all).")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def _load_sweep(path: str) -> list[dict]:
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"--sweep={path}: no such Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.get_sweep())


def main(argv):
  del argv
  from tapestry_jax import references, sweep

  quiet_library_logs()
  with exit_on_bad_input():
    runs = _load_sweep(_SWEEP.value)
    if _RUNS.value:
      runs = sweep.select_runs(runs, _RUNS.value)
    rows = sweep.run_sweep(_CONFIG.value, runs, _WORKDIR.value, alone=_ALONE.value,
                           data_parallel=_DP.value, reference_cache=(
                               references.default_cache_dir() if _CACHE.value is None
                               else _CACHE.value))
  print(sweep.table(rows))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
