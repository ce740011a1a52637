"""MuLoCo (Muon as the inner optimizer) against DiLoCo (AdamW inside) on debref, both under
DiLoCo's outer Nesterov (lr 0.7, momentum 0.9), at a few H; and Muon's lr at H=5.

  python -m launch.sweep --config=experiments/configs/federation.py:debref+fedavg \
      --sweep=experiments/sweeps/muon.py --workdir=/tmp/sweep_muon --noalone

400 inner steps per site at every H (rounds = 400 / H). The federated sites' inner
optimizer comes from federation.inner (`train` stays the references' AdamW recipe): Muon
on the hidden matrices, one per layer, with train.muon_lr (0.02) on the AdamW schedule,
and AdamW on the embeddings, output layer and norm scales (tapestry_jax/train.py _muon).
Measured arms: docs/federation.md (the MuLoCo and outer momentum paragraph).
"""

NESTEROV = {"federation.outer.name": "nesterov", "federation.outer.lr": 0.7,
            "federation.outer.momentum": 0.9}


def _run(inner: str, h: int, **kw):
  return {"name": f"{inner}_h{h}", **NESTEROV, "federation.inner.optimizer": inner,
          "federation.inner_steps": h, "federation.rounds": 400 // h,
          "federation.eval_every": max(1, 100 // h), **kw}


def get_sweep():
  return [
      *(_run(inner, h) for h in (5, 10, 25) for inner in ("adamw", "muon")),
      *({**_run("muon", 5), "name": f"muon_h5_lr{lr:g}", "federation.inner.muon_lr": lr}
        for lr in (0.01, 0.04)),
  ]
