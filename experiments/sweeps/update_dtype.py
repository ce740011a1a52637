"""What sites send: float32, bfloat16, int8 or float8 pseudo-gradients, int8 with and
without error feedback, at the config's H (debref: FedAvg, H=5).

  python -m launch.sweep --config=experiments/configs/federation.py:debref+fedavg \
      --sweep=experiments/sweeps/update_dtype.py --workdir=/tmp/sweep_dtype --noalone

int8 sends 4x fewer bytes than float32 (INTELLECT-1's per-tensor codes,
tapestry_jax/quantize.py); error feedback carries what encoding lost into the site's
next update.

Measured (debref, FedAvg H=5, 80 rounds; held-out bpb, mean of en/fr/id/ja; MiB sent per
site): float32 2.9690 (1801.6), bfloat16 2.9690 (900.8), int8 2.9689 (450.4), int8 with
error feedback 2.9691 (450.4), float8 2.9691 (450.4). Data parallelism sends 2252 MiB per
site.
"""


def get_sweep():
  return [
      {"name": "float32", "federation.update_dtype": "float32"},
      {"name": "bfloat16", "federation.update_dtype": "bfloat16"},
      {"name": "int8", "federation.update_dtype": "int8"},
      {"name": "int8_ef", "federation.update_dtype": "int8",
       "federation.error_feedback": True},
      {"name": "float8", "federation.update_dtype": "float8_e4m3fn"},
  ]
