"""4-bit codes and top-k against the variants' default float8, under shared moments
(debref: H=4, 100 rounds).

  python -m launch.sweep --config=experiments/configs/federation.py:debref \
      --sweep=experiments/sweeps/codecs.py --workdir=/tmp/sweep_codecs --noalone

int4 and float4_e2m1fn send 4 bits and a float32 scale per 128 elements of a row
(tapestry_jax/update_codecs.py); top-k sends the 3% largest entries of every row (their
values in the update dtype, their uint16 column indices) and carries what it drops into
the next update (error feedback). Under shared moments the first moments are sent dense,
in federation.moment_dtype (= update_dtype unless set). Measured figures: docs/federation.md.
"""


def get_sweep():
  return [
      {"name": "float8", "federation.update_dtype": "float8_e4m3fn"},
      {"name": "int4", "federation.update_dtype": "int4"},
      {"name": "float4", "federation.update_dtype": "float4_e2m1fn"},
      {"name": "topk3_float8", "federation.update_dtype": "float8_e4m3fn",
       "federation.topk_density": 0.03},
  ]
