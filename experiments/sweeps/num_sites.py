"""Number of sites (2, 3, 4), one synthetic language each.

  python -m launch.sweep --config=experiments/configs/federation.py:tiny+fedavg \
      --sweep=experiments/sweeps/num_sites.py --workdir=/tmp/sweep_sites
"""


def get_sweep():
  names = ["latin", "cyrillic", "greek", "kana"]
  return [{"name": f"sites{k}", "sites": ",".join(names[:k])} for k in (2, 3, 4)]
