"""Outer optimizer and learning rate: DiLoCo's Nesterov at a few (lr, momentum), FedAvg
(plain SGD lr 1), Adam with the large epsilon the paper needs, and plain averaging.

  python -m launch.sweep --config=experiments/configs/federation.py:tiny+fedavg \
      --sweep=experiments/sweeps/outer_optimizer.py --workdir=/tmp/sweep_outer
"""


def get_sweep():
  runs = [{"name": f"nesterov_lr{lr}_m{m}", "federation.outer.name": "nesterov",
           "federation.outer.lr": lr, "federation.outer.momentum": m}
          for lr, m in ((0.7, 0.9), (0.4, 0.9), (1.0, 0.5), (0.7, 0.0))]
  runs.append({"name": "fedavg", "federation.outer.name": "sgd", "federation.outer.lr": 1.0,
               "federation.outer.momentum": 0.0})
  runs.append({"name": "adam_eps0.1", "federation.outer.name": "adam",
               "federation.outer.lr": 0.01, "federation.outer.eps": 0.1})
  runs.append({"name": "average", "federation.outer.name": "none"})
  return runs
