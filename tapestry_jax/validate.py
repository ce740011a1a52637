"""Up-front checks of a site config: every mistake is one clear line, before compiling.

`launch/*` call `check_site_config` first and turn a `ConfigError` (or a data
pipeline's `DataError`) into a single error line and a non-zero exit.
"""

from __future__ import annotations

import jax

from tapestry_jax import attention
from tapestry_jax import init_from
from tapestry_jax import model as model_lib
from tapestry_jax import sharding
from tapestry_jax import train as train_lib


class ConfigError(ValueError):
  """A configuration that cannot run; the message says which field and why."""


def check_site_config(config, devices: list[jax.Device] | None = None) -> tuple[int, ...]:
  """Validates model, training, mesh and data settings; returns the resolved mesh shape."""
  import data_pipelines  # Deferred: keeps `tapestry_jax` importable without the data stack.

  devices = list(devices or jax.devices())
  try:
    dims = sharding.resolve_mesh_shape(dict(config.mesh), len(devices))
  except sharding.MeshError as e:
    raise ConfigError(str(e)) from None
  mesh_shape = dict(zip(sharding.MESH_AXES, dims))

  mcfg = model_lib.ModelConfig.from_config(config.model)
  try:
    mcfg.validate()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  tensor = mesh_shape["tensor"]
  for name in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
    if getattr(mcfg, name) % tensor:
      raise ConfigError(f"model.{name}={getattr(mcfg, name)} is not divisible by "
                        f"mesh.tensor={tensor}")
  if attention.resolve(mcfg.attention) == "cudnn":
    docs = config.data.get("max_documents_per_row", 0)
    if not 0 < docs < mcfg.max_segments:
      raise ConfigError(
          f"attention=cudnn packs at most model.max_segments={mcfg.max_segments} runs per row "
          f"(documents, then padding): data.max_documents_per_row={docs} must be in "
          f"[1, {mcfg.max_segments - 1}]")
  if mcfg.d_model % mesh_shape["fsdp"]:
    raise ConfigError(f"model.d_model={mcfg.d_model} is not divisible by mesh.fsdp={mesh_shape['fsdp']}")

  t = config.train
  batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
  if t.global_batch_size <= 0 or t.steps <= 0:
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} and train.steps={t.steps} "
                      "must be positive")
  if t.microbatches <= 0 or t.global_batch_size % t.microbatches:
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                      f"train.microbatches={t.microbatches}")
  micro = t.global_batch_size // t.microbatches
  if micro % batch_ways:
    raise ConfigError(
        f"train.global_batch_size={t.global_batch_size} / microbatches={t.microbatches} = {micro} "
        f"sequences is not divisible by the data axes (data x fsdp = {batch_ways})")
  if t.global_batch_size % jax.process_count():
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
  if t.schedule not in ("cosine", "wsd", "constant"):
    raise ConfigError(f"train.schedule must be cosine|wsd|constant, got {t.schedule!r}")
  if t.get("optimizer", "adamw") not in train_lib.OPTIMIZERS:
    raise ConfigError(f"train.optimizer must be {'|'.join(train_lib.OPTIMIZERS)}, "
                      f"got {t.optimizer!r}")
  if t.warmup_steps < 0 or t.lr <= 0:
    raise ConfigError(f"train.lr={t.lr} must be > 0 and train.warmup_steps={t.warmup_steps} >= 0")
  try:
    train_lib.make_optimizer(t, mcfg)  # The optimizer's own settings (e.g. train.muon_lr).
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for name in ("log_every", "checkpoint_every"):
    if t[name] <= 0:
      raise ConfigError(f"train.{name}={t[name]} must be positive")

  try:
    init_from.check(t)
  except init_from.InitError as e:
    raise ConfigError(str(e)) from None

  data_pipelines.validate(config.data)
  tokenizer_vocab = data_pipelines.make_tokenizer(config.data).vocab_size
  if tokenizer_vocab > mcfg.vocab_size:
    raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the "
                      f"{config.data.tokenizer} tokenizer's vocabulary ({tokenizer_vocab})")
  return dims
