"""Non-IID (each site one language) vs IID (every site a shuffle of all four).

  python -m launch.sweep --config=experiments/configs/federation.py:tiny+fedavg \
      --sweep=experiments/sweeps/data_split.py --workdir=/tmp/sweep_iid
"""

SITES = ("latin", "cyrillic", "greek", "kana")


def get_sweep():
  iid = {"name": "iid"}
  for i, s in enumerate(SITES):
    iid[f"sites.{s}.languages"] = ",".join(SITES)
    iid[f"sites.{s}.data_seed"] = i  # Different shuffles of the same mixture.
  return [{"name": "non_iid"}, iid]
