"""The site trainer's compiled core: optimizer, train state, train and eval steps.

Data flow: host batch (numpy, from data_pipelines) -> `Trainer.shard_batch` -> jitted
`train_step(state, batch) -> (state, metrics)` with explicit in/out shardings and buffer
donation. The loop that drives it (logging, eval, checkpoints) is in `loop.py`; the
federated outer loop reuses `Trainer` for its inner steps.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tapestry_jax import attention
from tapestry_jax import init_from as init_from_lib
from tapestry_jax import model as model_lib
from tapestry_jax import sharding

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "target_bytes")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: model_lib.Params
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] raw PRNG key, saved with the state for exact resume


def make_schedule(tcfg, peak: float | None = None) -> optax.Schedule:
  """Learning-rate schedule: linear warmup, then cosine, warmup-stable-decay or constant,
  peaking at `peak` (default `tcfg.lr`; Muon's matrices use `tcfg.muon_lr`)."""
  peak = float(tcfg.lr if peak is None else peak)
  warmup, total = int(tcfg.warmup_steps), int(tcfg.steps)
  end = peak * float(tcfg.min_lr_ratio)
  if tcfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end)
  if tcfg.schedule == "wsd":
    decay = max(1, int(round(total * float(tcfg.decay_fraction))))
    stable = max(0, total - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, decay)],
        boundaries=[warmup, warmup + stable])
  if tcfg.schedule == "constant":
    if warmup == 0:  # (optax warns about a zero-length warmup, which is just the constant)
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"train.schedule must be cosine|wsd|constant, got {tcfg.schedule!r}")


def _decay_mask(params):
  """Weight decay on matrices only: not on norm scales (which are 2-D when stacked)."""
  def keep(path, _):
    return not any("norm" in str(getattr(p, "key", "")) for p in path)
  return jax.tree_util.tree_map_with_path(keep, params)


def _init_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(parameter-init key, training PRNG key) of a seed: one derivation for every caller."""
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, rng


def initial_params(model_cfg: model_lib.ModelConfig, seed: int, tcfg=None):
  """The params `Trainer.init_state(seed)` starts from, built without a mesh (the
  federation's coordinator publishes them as global round 0). Threefry draws do not
  depend on sharding, so these equal the sharded init bit for bit. With
  `tcfg.init_from` (a train config), those params (`init_from.load`), on one device."""
  if tcfg is not None and tcfg.get("init_from", ""):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(lambda: model_lib.init_params(
                                model_cfg, jax.random.key(0))))
    return init_from_lib.load(tcfg, abstract)
  return jax.jit(lambda s: model_lib.init_params(model_cfg, _init_keys(s)[0]))(
      jnp.asarray(seed, jnp.uint32))


OPTIMIZERS = ("adamw", "sgd", "muon")
MUON_LR = 0.02  # Keller Jordan's Muon lr (with its width scaling): the train.muon_lr default.
MUON_MOMENTUM = 0.95  # Keller Jordan's Muon momentum (Nesterov): train.muon_momentum's default.


def muon_dimension_numbers(model_cfg: model_lib.ModelConfig):
  """Which leaves Muon orthogonalizes, and how: a params-shaped tree holding, for each
  hidden matrix (a leaf under `layers` with a matrix per layer), the `MuonDimensionNumbers`
  that split it at its `embed` axis into (inputs, outputs) with the leading `layers` axis
  a batch axis, so every layer's matrix is orthogonalized on its own (wq: D x H*Dh,
  wo: H*Dh x D); None for the embeddings, the output layer and the norm scales, which
  AdamW updates (as in Muon's and MuLoCo's recipes)."""
  def dims(axes):
    if axes[0] != "layers" or len(axes) < 3:
      return None
    e = axes.index("embed")
    if e == 1:  # The residual stream in: embed x (heads, head_dim) or embed x mlp.
      return optax.contrib.MuonDimensionNumbers(reduction_axis=(1,),
                                                output_axis=tuple(range(2, len(axes))))
    return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(1, e)),
                                              output_axis=(e,))
  return jax.tree.map(dims, model_lib.logical_axes(model_cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def _muon(tcfg, model_cfg: model_lib.ModelConfig) -> optax.GradientTransformation:
  """Muon on the hidden matrices (`muon_dimension_numbers`), the AdamW recipe on the rest.

  The matrices take optax.contrib.muon (Nesterov momentum `muon_momentum`, 5 Newton-Schulz
  steps, width scaling sqrt(max(1, fan_out / fan_in))) on `make_schedule` peaking at
  `muon_lr`, and decay as under AdamW: by lr(t) x weight_decay per step (optax's muon
  multiplies its decay by its own lr, so it gets weight_decay x lr / muon_lr). The other
  leaves take exactly the `adamw` optimizer (b1, b2, eps, decay sparing norm scales), not
  optax muon's own Adam fallback (Nesterov Adam, decaying every leaf)."""
  muon_lr = float(tcfg.get("muon_lr", MUON_LR))
  momentum = float(tcfg.get("muon_momentum", MUON_MOMENTUM))
  if not (math.isfinite(muon_lr) and muon_lr > 0):
    raise ValueError(f"train.muon_lr must be > 0; got {muon_lr!r}")
  if not 0 <= momentum < 1:
    raise ValueError(f"train.muon_momentum must be in [0, 1); got {momentum!r}")
  dims = muon_dimension_numbers(model_cfg)
  is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  labels = jax.tree.map(lambda d: "adamw" if d is None else "muon", dims, is_leaf=is_dims)
  muon = optax.contrib.muon(make_schedule(tcfg, muon_lr), beta=momentum,
                            weight_decay=float(tcfg.weight_decay) * float(tcfg.lr) / muon_lr,
                            muon_weight_dimension_numbers=dims)
  return optax.partition({"muon": muon, "adamw": _adamw(tcfg)}, labels)


def _adamw(tcfg) -> optax.GradientTransformation:
  return optax.adamw(make_schedule(tcfg), b1=float(tcfg.b1), b2=float(tcfg.b2),
                     eps=float(tcfg.eps), weight_decay=float(tcfg.weight_decay),
                     mask=_decay_mask)


def make_optimizer(tcfg, model_cfg: model_lib.ModelConfig | None = None
                   ) -> optax.GradientTransformation:
  """Global-norm clipping followed by `tcfg.optimizer` on `make_schedule`: AdamW (the
  default), plain SGD (the inner optimizer of FedAdam-style federations, whose
  adaptivity lives in the outer optimizer) or Muon on the hidden matrices of the model
  `model_cfg` with AdamW on the rest (`_muon`; MuLoCo's inner optimizer)."""
  name = tcfg.get("optimizer", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
  clip = (optax.clip_by_global_norm(float(tcfg.grad_clip)) if tcfg.grad_clip > 0
          else optax.identity())
  if name == "sgd":
    return optax.chain(clip, optax.sgd(make_schedule(tcfg)))
  if name == "muon":
    if model_cfg is None:
      raise ValueError("train.optimizer muon needs the model config (which leaves are matrices)")
    return optax.chain(clip, _muon(tcfg, model_cfg))
  return optax.chain(clip, _adamw(tcfg))


def _state_shardings(abstract_opt, abstract_params, param_shardings, replicated):
  """The optimizer state's shardings: a leaf whose key path ends with a parameter's path
  and has its shape (a moment, a trace) is sharded like that parameter; step counts and
  the rest are replicated. (optax.tree_map_params cannot trace optax.contrib.muon.)"""
  params = {tuple(path): (a.shape, sh) for (path, a), sh in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings))}
  depth = {len(path) for path in params}

  def pick(path, leaf):
    for n in depth:
      shape, sh = params.get(tuple(path[-n:]), (None, None))
      if shape == leaf.shape:
        return sh
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


class Trainer:
  """Compiled train/eval steps of one model on one mesh.

  Everything is a pure function of its inputs; this object only holds the compiled
  functions and the shardings they were compiled for."""

  def __init__(self, model_cfg: model_lib.ModelConfig, tcfg, mesh: jax.sharding.Mesh):
    self.model_cfg = model_cfg
    self.mesh = mesh
    self.microbatches = int(tcfg.microbatches)
    self.schedule = make_schedule(tcfg)
    self.optimizer = make_optimizer(tcfg, model_cfg)

    self.param_shardings = model_lib.param_shardings(model_cfg, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_params = jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0)))
    abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
    opt_shardings = _state_shardings(abstract_opt, abstract_params, self.param_shardings,
                                     replicated)
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                      opt_state=opt_shardings, rng=replicated)
    self.batch_sharding = sharding.named_sharding(mesh, ("batch", "length"))
    self.replicated = replicated
    # cuDNN's packed attention holds at most max_segments runs of segment ids per row.
    self._max_runs = (model_cfg.max_segments if attention.resolve(model_cfg.attention) == "cudnn"
                      else None)

    self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
    # train.init_from: params to start from instead of a random init (`init_from.load`).
    self.tcfg = tcfg
    self._init_at = jax.jit(self._fresh_state, out_shardings=self.state_shardings)
    self.train_step = jax.jit(
        self._train_step_fn,
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=0)
    self.eval_step = jax.jit(
        self._eval_step_fn,
        in_shardings=(self.param_shardings, self.batch_sharding),
        out_shardings=replicated)

  # ------------------------------------------------------------------ state

  def _init_fn(self, seed: jax.Array) -> TrainState:
    return self._fresh_state(model_lib.init_params(self.model_cfg, _init_keys(seed)[0]), seed)

  def _fresh_state(self, params, seed: jax.Array) -> TrainState:
    """Step 0 at `params`: a fresh optimizer state and the training PRNG key of `seed`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params), rng=_init_keys(seed)[1])

  def init_state(self, seed: int) -> TrainState:
    """A fresh state, created directly sharded (no full copy on any one device). With
    `train.init_from`, the params are that checkpoint's (restored onto this mesh) and
    the optimizer state, step and PRNG key are fresh."""
    with jax.set_mesh(self.mesh):
      if not self.tcfg.get("init_from", ""):
        return self._init(jnp.asarray(seed, jnp.uint32))
      params = init_from_lib.load(self.tcfg, self.abstract_state().params)
      return self._init_at(params, jnp.asarray(seed, jnp.uint32))

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs carrying this mesh's shardings: the restore target."""
    shapes = jax.eval_shape(self._init_fn, jnp.asarray(0, jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def shard_batch(self, batch: dict[str, np.ndarray]) -> Batch:
    """This process's rows of the global batch -> global arrays on the mesh."""
    if self._max_runs is not None:
      runs = attention.count_runs(batch["segment_ids"])
      if runs > self._max_runs:
        raise ValueError(
            f"a packed row holds {runs} documents and padding runs, but attention=cudnn is "
            f"built for model.max_segments={self._max_runs}: set data.max_documents_per_row "
            f"below model.max_segments")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch[k]))
            for k in BATCH_KEYS}

  # ------------------------------------------------------------------ steps

  def _loss_sums(self, params, batch: Batch):
    ce_BxL, z_BxL, mask_BxL = model_lib.token_losses(params, batch, self.model_cfg)
    ce_sum, z_sum = ce_BxL.sum(), z_BxL.sum()
    return ce_sum + z_sum, (ce_sum, z_sum, mask_BxL.sum())

  def _train_step_fn(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
    M = self.microbatches
    if M == 1:
      (_, (ce_sum, z_sum, n_tokens)), grads = grad_fn(state.params, batch)
    else:
      # Row r of the batch goes to microbatch r % M: every microbatch stays spread over
      # all data-parallel devices, so the reshape moves no data.
      def split(x_BxL):
        B, L = x_BxL.shape
        return x_BxL.reshape(B // M, M, L).swapaxes(0, 1)

      micro = jax.tree.map(split, batch)

      def accumulate(carry, mb):
        g_acc, sums = carry
        mb = jax.tree.map(lambda x: sharding.constrain(x, ("batch", "length")), mb)
        (_, aux), g = grad_fn(state.params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, sums, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      sums0 = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
      (grads, (ce_sum, z_sum, n_tokens)), _ = jax.lax.scan(accumulate, (zeros, sums0), micro)

    # Mean over the real (non-padding) tokens of the whole global batch.
    denom = jnp.maximum(n_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    metrics = {"loss": ce_sum / denom, "z_loss": z_sum / denom, "grad_norm": grad_norm,
               "lr": self.schedule(state.step), "tokens": n_tokens}
    return new_state, metrics

  def _eval_step_fn(self, params, batch: Batch) -> dict[str, jax.Array]:
    ce_BxL, _, mask_BxL = model_lib.token_losses(params, batch, self.model_cfg)
    return {"loss_sum": ce_BxL.sum(), "tokens": mask_BxL.sum(),
            "bytes": (batch["target_bytes"] * (batch["segment_ids"] > 0)).sum().astype(jnp.float32)}


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
  """Eval loss (nats/token), perplexity and bits per byte from summed eval statistics."""
  tokens = max(float(sums["tokens"]), 1.0)
  loss = float(sums["loss_sum"]) / tokens
  bpb = float(sums["loss_sum"]) / math.log(2) / max(float(sums["bytes"]), 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)),
          "eval_bits_per_byte": bpb, "eval_tokens": tokens}


def eval_sums(trainer: Trainer, params, batches) -> dict[str, float]:
  """The eval step's sums (loss_sum, tokens, bytes) over an iterable of host batches,
  added up on the host in float64 (exact token counts at any size); batch t is
  dispatched before batch t-1's sums are read. ValueError if there are no batches."""
  totals: dict[str, float] = {}
  pending = None
  for host_batch in batches:
    out = trainer.eval_step(params, trainer.shard_batch(host_batch))
    if pending is not None:
      _add_to(totals, pending)
    pending = out
  if pending is None:
    raise ValueError("evaluation got no batches (is the eval split empty?)")
  _add_to(totals, pending)
  return totals


def _add_to(totals: dict[str, float], device_sums) -> None:
  for k, v in jax.device_get(device_sums).items():
    totals[k] = totals.get(k, 0.0) + float(v)


def evaluate(trainer: Trainer, params, batches) -> dict[str, float]:
  """Runs the eval step over an iterable of host batches and summarises it."""
  return summarize_eval(eval_sums(trainer, params, batches))
