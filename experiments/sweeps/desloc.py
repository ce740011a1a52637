"""Moments synced less often than params (`federation.moment_sync_every`, K; DES-LOC) on
debref at 2,000 inner steps per site: what sending the first moment every K-th round
costs in quality, at H=16.

  python -m launch.sweep --config=experiments/configs/federation.py:debref2k \
      --sweep=experiments/sweeps/desloc.py --workdir=/tmp/sweep_desloc --data_parallel

Every run is shared Adam moments (`+moments`) with float8 updates and float32 reads
at H=16 (125 rounds); k1 is today's shared moments (`m16` of
`experiments/sweeps/communication.py`). In a param round (r % K != 0) sites send their
pseudo-gradient only and keep training their own moments; in a moment round they also
send their first moment and adopt the global moments. Sent per parameter and round:
(1 + 1/K) x the update's bytes; read: 4 + 8/K float32 bytes, or (1 + 1/K) x the
download's bytes with encoded downloads (the `_f4_d8` runs). Results:
docs/communication.md.
"""

STEPS = 2000  # Inner steps per site (debref2k).
H = 16
EVALS = 5  # Evaluations of the global model per run (and the last round).

# The variants' shared moments before the debref2k default (float4 both ways): float8
# updates, float32 reads.
F8 = {"federation.update_dtype": "float8_e4m3fn", "federation.download_dtype": "float32"}

F4_D8 = {"federation.update_dtype": "float4_e2m1fn",
         "federation.download_dtype": "float8_e4m3fn"}


def _k(k: int, name: str = "", **kw):
  """Shared moments at H=16, the first moments synced every `k` rounds."""
  rounds = STEPS // H
  return {"name": name or f"k{k}", "federation.inner_steps": H, "federation.rounds": rounds,
          "federation.eval_every": max(1, rounds // EVALS),
          "federation.moment_sync_every": k, **F8, **kw}


def get_sweep():
  return [
      _k(1),
      _k(2),
      _k(4),
      # 4-bit updates and float8 downloads: the bytes levers together.
      _k(1, "k1_f4_d8", **F4_D8),
      _k(2, "k2_f4_d8", **F4_D8),
      _k(4, "k4_f4_d8", **F4_D8),
      _k(8, "k8_f4_d8", **F4_D8),  # 0.63 bytes sent and 1.19 read per parameter a round.
  ]
