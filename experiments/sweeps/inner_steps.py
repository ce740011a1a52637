"""H (inner steps per round) at a fixed budget of 300 inner steps per site.

  python -m launch.sweep --config=experiments/configs/federation.py:tiny+fedavg \
      --sweep=experiments/sweeps/inner_steps.py --workdir=/tmp/sweep_h
"""


def get_sweep():
  return [{"name": f"H{h}", "federation.inner_steps": h, "federation.rounds": 300 // h}
          for h in (10, 25, 50, 100)]
