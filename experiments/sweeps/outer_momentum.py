"""The outer Nesterov momentum's warmup and decay over rounds (Pier) against a constant
momentum, DiLoCo (lr 0.7, momentum 0.9, inner AdamW) on debref at H=5 and H=25.

  python -m launch.sweep --config=experiments/configs/federation.py:debref+fedavg \
      --sweep=experiments/sweeps/outer_momentum.py --workdir=/tmp/sweep_outer_momentum \
      --noalone

400 inner steps per site (rounds R = 400 / H). warmup: the momentum rises from 0 to 0.9
over the first R / 10 rounds; decay: it falls to 0 over the last R / 5 rounds; pier: both
(outer.momentum_warmup_rounds, momentum_decay_rounds; tapestry_jax/outer_config.py).
Measured arms: docs/federation.md (the MuLoCo and outer momentum paragraph).
"""


def _run(name: str, h: int, **kw):
  return {"name": f"{name}_h{h}", "federation.outer.name": "nesterov",
          "federation.outer.lr": 0.7, "federation.outer.momentum": 0.9,
          "federation.inner_steps": h, "federation.rounds": 400 // h,
          "federation.eval_every": max(1, 100 // h), **kw}


def get_sweep():
  runs = []
  for h in (5, 25):
    rounds = 400 // h
    warmup = {"federation.outer.momentum_warmup_rounds": max(1, rounds // 10)}
    decay = {"federation.outer.momentum_decay_rounds": max(1, rounds // 5)}
    runs += [_run("constant", h), _run("warmup", h, **warmup), _run("decay", h, **decay),
             _run("pier", h, **warmup, **decay)]
  return runs
