"""DiLoCo in one process, for any pure loss: the library's reference federated run.

`run_diloco` simulates k sites and the coordinator on one host. Each round every live
site starts from the current global params, takes H inner optimizer steps on its own
data (keeping its own inner optimizer state across rounds), and sends the pseudo-gradient
`global - local`; the sites' updates are weighted, optionally clipped and robustly
aggregated, and merged as a `outer_config.RoundMergeSpec` says (`spec.outer_step`, the
same per-leaf jitted function the streaming coordinator runs).
Tests of the algorithm's special cases (FedAvg, H=1 == data parallelism) run on it, and
so can quick experiments with toy losses.

Example (two sites fitting one linear model on differently scaled data):

    import jax, jax.numpy as jnp, numpy as np, optax
    from tapestry_jax import diloco, outer_config

    def loss_fn(params, batch):
      pred_B = batch["x_BxD"] @ params["w_D"] + params["b"]
      return jnp.mean((pred_B - batch["y_B"]) ** 2)

    def batches(seed, scale):
      rng = np.random.default_rng(seed)
      while True:
        x_BxD = scale * rng.normal(size=(16, 3)).astype(np.float32)
        yield {"x_BxD": x_BxD, "y_B": x_BxD @ np.array([1., -2., 0.5], np.float32) + 0.3}

    result = diloco.run_diloco(
        loss_fn, {"w_D": jnp.zeros(3), "b": jnp.zeros(())},
        [batches(0, 1.0), batches(1, 2.0)],
        inner_optimizers=optax.adamw(1e-2),
        spec=outer_config.RoundMergeSpec.from_config(outer_config.default_outer_config()),
        rounds=20, inner_steps=10)
    print(result.params, result.history[-1]["loss"])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import optax

from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax import trees


@dataclasses.dataclass
class DilocoResult:
  """Everything a `run_diloco` call ends with."""
  params: Any  # the final global params (same structure as init_params)
  outer_state: dict[str, optax.OptState]  # per-leaf outer optimizer state (outer.init_outer_state)
  site_params: list[Any]  # each site's params after its last inner step
  site_opt_states: list[optax.OptState]  # each site's inner optimizer state (kept across rounds)
  history: list[dict[str, Any]]  # one record per round, see run_diloco


def _make_inner_step(loss_fn: Callable, tx: optax.GradientTransformation):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step)


def run_diloco(
    loss_fn: Callable[[Any, Any], jax.Array],
    init_params: Any,
    site_batches: Sequence[Iterable[Any]],
    inner_optimizers: optax.GradientTransformation | Sequence[optax.GradientTransformation],
    spec: outer_config.RoundMergeSpec,
    *,
    rounds: int,
    inner_steps: int,
    tokens_fn: Callable[[Any], int] | None = None,
    participating: Callable[[int, int], bool] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> DilocoResult:
  """Runs `rounds` DiLoCo rounds of `inner_steps` (H) inner steps on each site, in-process.

  Args:
    loss_fn: pure `loss_fn(params, batch) -> scalar` (mean reduction over the batch, so
      gradients are per-example averages).
    init_params: the initial global params (any pytree of float arrays).
    site_batches: one iterable of batches per site; each inner step takes the next one.
    inner_optimizers: one optax transformation for every site, or one per site. Each
      site's inner state lives across rounds (ALGORITHMS.md: sites keep their own AdamW
      state); the inner step is jitted once per distinct optimizer object.
    spec: the round merge (`outer_config.RoundMergeSpec`: outer optimizer, weight cap in
      `tokens_fn` units, robust settings, outer clip); a round whose live sites are too
      few for its aggregator raises ValueError. With shared moments
      (`spec.shared_moments`) the inner optimizers must be Adam-family (one optax
      ScaleByAdamState): every live site starts each round from the global moments and
      step count, and sends its first moment with its delta.
    rounds, inner_steps: T and H.
    tokens_fn: `batch -> count` that weights the sites (summed over the round's H
      batches). Default: every batch counts 1, i.e. equal weights.
    participating: `(round, site) -> bool`; False simulates a dropped site for that round:
      it does not receive the global at the round's start, keeps training from its own
      weights, and its delta is not merged. It rejoins by taking the current global at
      the start of the next round it participates in. Weights are renormalised over the
      live sites; a round with no live site leaves the global and outer state unchanged.
    callback: called after each round with that round's history record.

  Returns:
    DilocoResult. Each history record has: "round", "loss" (mean inner loss per site over
    the round's H steps), "live" (per site), "tokens" (per site), "weights" (per site,
    0.0 for dropped sites; live weights sum to 1).
  """
  n_sites = len(site_batches)
  if n_sites == 0:
    raise ValueError("run_diloco needs at least one site")
  if int(rounds) < 1 or int(inner_steps) < 1:
    raise ValueError(f"rounds={rounds} and inner_steps={inner_steps} must be >= 1")
  if isinstance(inner_optimizers, optax.GradientTransformation):
    txs = [inner_optimizers] * n_sites
  else:
    txs = list(inner_optimizers)
    if len(txs) != n_sites:
      raise ValueError(f"got {len(txs)} inner optimizers for {n_sites} sites")

  # One jitted step per distinct optimizer object (several sites may share one).
  steps_by_id: dict[int, Callable] = {}
  for tx in txs:
    if id(tx) not in steps_by_id:
      steps_by_id[id(tx)] = _make_inner_step(loss_fn, tx)
  steps = [steps_by_id[id(tx)] for tx in txs]
  moments = spec.shared_moments

  iters: list[Iterator[Any]] = [iter(b) for b in site_batches]
  global_params = jax.tree.map(jnp.asarray, init_params)
  outer_state = outer.init_outer_state(spec.tx, global_params)
  site_params = [global_params] * n_sites
  site_opt_states = [tx.init(global_params) for tx in txs]
  history: list[dict[str, Any]] = []

  for r in range(int(rounds)):
    live = [bool(participating(r, i)) if participating is not None else True
            for i in range(n_sites)]
    losses, tokens = [], []
    for i in range(n_sites):
      if live[i]:
        site_params[i] = global_params  # jax arrays are immutable: sharing is safe
        if moments:  # The global Adam state replaces the site's (outer.SharedMoments).
          count, mu, nu = outer.global_moments(outer_state)
          site_opt_states[i] = outer.set_adam_state(
              site_opt_states[i], trees.unflatten(mu, global_params),
              trees.unflatten(nu, global_params), lambda: jnp.asarray(count, jnp.int32))
      params, opt_state, count, losses_i = site_params[i], site_opt_states[i], 0, []
      for s in range(int(inner_steps)):
        try:
          batch = next(iters[i])
        except StopIteration:
          raise ValueError(f"site {i} ran out of batches at round {r}, inner step {s}") from None
        count += int(tokens_fn(batch)) if tokens_fn is not None else 1
        params, opt_state, loss = steps[i](params, opt_state, batch)
        losses_i.append(loss)
      site_params[i], site_opt_states[i] = params, opt_state
      losses.append(float(jnp.mean(jnp.stack(losses_i))))
      tokens.append(count)

    live_ids = [i for i in range(n_sites) if live[i]]
    weights = [0.0] * n_sites
    if live_ids:
      w_live = spec.weights([tokens[i] for i in live_ids])
      # Each update carries its site's first moment under shared moments.
      updates = [outer.Update(outer.pseudo_gradient(global_params, site_params[i]),
                              optax.tree_utils.tree_get(site_opt_states[i], "mu")
                              if moments else None) for i in live_ids]
      global_params, outer_state = spec.outer_step(global_params, outer_state, updates, w_live)
      for i, w in zip(live_ids, w_live):
        weights[i] = float(w)

    record = {"round": r, "loss": losses, "live": live, "tokens": tokens, "weights": weights}
    history.append(record)
    if callback is not None:
      callback(record)

  return DilocoResult(params=global_params, outer_state=outer_state, site_params=site_params,
                      site_opt_states=site_opt_states, history=history)
