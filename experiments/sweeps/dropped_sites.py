"""Sites whose update misses a round with probability p (DiLoCo reports <= +2.1%
perplexity at p = 0.5).

  python -m launch.sweep --config=experiments/configs/federation.py:tiny+fedavg \
      --sweep=experiments/sweeps/dropped_sites.py --workdir=/tmp/sweep_drop
"""


def get_sweep():
  return [{"name": f"drop{p}", "drop_probability": p} for p in (0.0, 0.25, 0.5)]
