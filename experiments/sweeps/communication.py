"""The communication frontier (issue 15) on debref at 2,000 inner steps per site.

  python -m launch.sweep --config=experiments/configs/federation.py:debref2k \
      --sweep=experiments/sweeps/communication.py --workdir=/tmp/sweep_comm \
      --data_parallel --runs=m16

Every run is shared Adam moments (`+moments`) with float8 updates and float32 reads
unless it says otherwise; only the round length H and what is sent change, so every run
shares the cached references (each site alone, data parallelism: `--reference_cache`).
The table's "sent x" and "read x" are data parallelism's bytes over the run's (array
bytes of the simulation); `experiments.benchmarks.federation_quality` measures them on
the deployed path, manifests included. Results: docs/communication.md.
"""

STEPS = 2000  # Inner steps per site (debref2k).
EVALS = 5  # Evaluations of the global model per run (and the last round).


# The variants' shared moments before the debref2k default (float4 both ways): float8
# updates, float32 reads.
F8 = {"federation.update_dtype": "float8_e4m3fn", "federation.download_dtype": "float32"}

F4_D8 = {"federation.update_dtype": "float4_e2m1fn",
         "federation.download_dtype": "float8_e4m3fn"}


def _m(h: int, name: str = "", **kw):
  """Shared moments at H=`h` for the whole budget."""
  if STEPS % h:
    raise ValueError(f"H={h} does not divide the {STEPS} steps of the budget")
  rounds = STEPS // h
  return {"name": name or f"m{h}", "federation.inner_steps": h, "federation.rounds": rounds,
          "federation.eval_every": max(1, rounds // EVALS), **F8, **kw}


def get_sweep():
  return [
      _m(4),
      _m(8),
      _m(16),
      _m(40),
      _m(16, "m16_float32", **{"federation.update_dtype": "float32"}),
      # 4-bit updates and float8 downloads: 1.11 bytes per parameter sent, 2.11 read a round.
      _m(20, "m20_f4_d8", **F4_D8),
      _m(25, "m25_f4_d8", **F4_D8),
      _m(40, "m40_f4_d8", **F4_D8),
  ]
