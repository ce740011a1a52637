"""Overlapped outer updates (`federation.overlap_steps`, tau) on debref: the quality cost
of hiding the exchange behind tau inner steps, at the default shared moments.

  python -m launch.sweep --config=experiments/configs/federation.py:debref \
      --sweep=experiments/sweeps/overlap.py --noalone --workdir=/tmp/sw_overlap

The base is the variant's default (`+moments`: H=4, 100 rounds, float8 updates, 400
inner steps per site); each arm trains the first tau steps of a phase from what the site
sent and carries that progress onto the next global round. Results: docs/federation.md.
"""


def _arm(h: int, tau: int):
  return {"name": f"h{h}_tau{tau}", "federation.inner_steps": h,
          "federation.rounds": 400 // h, "federation.eval_every": max(1, 100 // h),
          "federation.overlap_steps": tau}


def get_sweep():
  return [*(_arm(4, tau) for tau in (1, 2, 4, 0)),
          *(_arm(8, tau) for tau in (2, 4, 8, 0))]
