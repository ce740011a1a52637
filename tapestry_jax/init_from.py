"""Where a run's params come from when it does not start from a random init
(`train.init_from`): another run's checkpoint, or a federation's global model.

  /path/to/workdir           a `launch.train` workdir (or its checkpoints/): the params of
                             its latest checkpoint (`checkpoint.restore_params`);
  file:// gs:// s3:// URL    a federation's global bucket: the committed global round
                             `train.init_round` (-1 = the one LATEST names), verified like a
                             site verifies it: the coordinator's signature with
                             `train.init_public_key` ("ed25519:...", the trust root's
                             `coordinator` key), the schema before anything is allocated,
                             and every chunk's digest as it is read;
  hf:DIR                     a Hugging Face Llama directory (safetensors; `tapestry_jax.hf`),
                             e.g. an open base model on disk or a `launch.export` output:
                             every tensor's shape is checked against the run's model first.

The second is how a site builds its own derivative model on the shared base after (or
during) a federation: `launch.train --config.train.init_from=s3://global/...`.
Either way the params land directly in the run's shardings (any mesh); the optimizer
state, step and data position start fresh. `read_global_params` is also how
`model_source` reads a global round to evaluate it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging

from tapestry_jax import buckets
from tapestry_jax import checkpoint
from tapestry_jax import hf
from tapestry_jax import model as model_lib
from tapestry_jax import trees
from tapestry_jax import trust
from tapestry_jax.checkpoint import InitError

COORDINATOR = "coordinator"  # The author of global rounds (`federation.COORDINATOR`).
HF = "hf:"  # The prefix of a Hugging Face directory.


def is_bucket(init_from: str) -> bool:
  return "://" in init_from


def is_hf(init_from: str) -> bool:
  return init_from.startswith(HF)


def load(tcfg, abstract_params) -> Any:
  """The params `tcfg.init_from` names, in the shardings of `abstract_params`
  (ShapeDtypeStructs). InitError (one line) for anything that cannot be used."""
  source = str(tcfg.get("init_from", "") or "")
  if is_hf(source):
    return _from_hf(source, abstract_params)
  if not is_bucket(source):
    return checkpoint.restore_params(source, abstract_params)
  params, _ = read_global_params(source, int(tcfg.get("init_round", -1)),
                                 str(tcfg.get("init_public_key", "") or ""), abstract_params)
  return params


def read_global_params(url: str, round_: int, public_key: str, abstract_params, *,
                       where: str = "", key_setting: str = "train.init_public_key"
                       ) -> tuple[Any, int]:
  """(params, round) of committed global round `round_` (-1: the one LATEST names) of the
  global bucket `url`, read into the shardings of `abstract_params`: the coordinator's
  signature verified with `public_key` (else a warning naming `key_setting`), the schema
  checked before anything is allocated, every chunk's digest as it is read. InitError,
  one line starting with `where` (default "train.init_from=URL"), otherwise."""
  # Here, not at the top: the round protocol imports the federation config, which
  # validates site configs with this module.
  from tapestry_jax import exchange  # pylint: disable=import-outside-toplevel

  where = where or f"train.init_from={url!r}"
  try:
    bucket = buckets.Bucket(url)
    if round_ < 0:
      round_ = exchange.read_latest(bucket)
      if round_ is None:
        raise InitError(f"{where}: no committed global round (no LATEST pointer)")
    prefix = exchange.global_prefix(round_)
    manifest = exchange.read_manifest(bucket, prefix)
    if manifest is None:
      raise InitError(f"{where}: global round {round_} is not committed")
    if manifest.get("kind") != "global" or manifest.get("round") != round_:
      raise InitError(f"{where}: {prefix} is not a global round's manifest")
    if public_key:
      try:
        trust.TrustRoot({COORDINATOR: public_key}).verify(manifest, COORDINATOR)
      except trust.TrustError as e:
        raise InitError(f"{where}: global round {round_}: {e}") from None
    else:
      logging.warning("%s: %s is not set, so who wrote global round %d is not verified "
                      "(its chunks are still checked against its manifest)",
                      where, key_setting, round_)
    flat = trees.flatten(abstract_params)
    schema = {f"params/{n}": (tuple(a.shape), str(a.dtype)) for n, a in flat.items()}
    params_manifest = dict(manifest, arrays={k: v for k, v in manifest["arrays"].items()
                                             if k.startswith("params/")})
    exchange.check_schema(params_manifest, schema)
    got = exchange.read_arrays(bucket, prefix, params_manifest,
                               {f"params/{n}": a.sharding for n, a in flat.items()})
  except (exchange.ExchangeError, buckets.BucketError) as e:
    raise InitError(f"{where}: {e}") from None
  logging.info("read global round %d of %s (federation %r)", round_, url,
               manifest.get("federation"))
  return trees.unflatten({n[len("params/"):]: a for n, a in got.items()},
                         abstract_params), round_


def _from_hf(source: str, abstract_params) -> Any:
  """A HF Llama directory's params, cast to the run's dtypes and placed leaf by leaf in
  its shardings, after every shape is compared with the run's model."""
  where = f"train.init_from={source!r}"
  directory = os.path.expanduser(source[len(HF):])
  cfg = _hf_config(source)
  stored = {n: tuple(s.shape) for n, s in trees.flatten(model_lib.param_specs(cfg)).items()}
  want = trees.flatten(abstract_params)
  if set(stored) != set(want):
    raise InitError(f"{where}: the checkpoint has tie_word_embeddings="
                    f"{str(cfg.tie_embeddings).lower()}, the run's model.tie_embeddings="
                    f"{'unembed' not in want}")
  for name, a in want.items():
    if stored[name] != tuple(a.shape):
      raise InitError(f"{where}: {name} has shape {stored[name]} in the checkpoint, the "
                      f"run's model.* needs {tuple(a.shape)}")

  def put(name: str, array):
    a = want[name]
    host = array.astype(a.dtype, copy=False)
    return jax.make_array_from_callback(a.shape, a.sharding, lambda index: host[index])

  try:
    params = hf.load_params(directory, cfg, put)
  except InitError as e:
    raise InitError(f"{where}: {e}") from None
  logging.info("starting from the Hugging Face model in %s", directory)
  return trees.unflatten(trees.flatten(params), abstract_params)


def _hf_config(source: str):
  try:
    return hf.load_config(os.path.expanduser(source[len(HF):]))
  except InitError as e:
    raise InitError(f"train.init_from={source!r}: {e}") from None


def check(tcfg) -> None:
  """Up-front checks of the init fields (before anything compiles)."""
  source = str(tcfg.get("init_from", "") or "")
  key = str(tcfg.get("init_public_key", "") or "")
  if is_hf(source):
    _hf_config(source)
  elif source and not is_bucket(source) and not os.path.isdir(checkpoint.checkpoint_dir(source)):
    raise InitError(f"train.init_from={source!r}: no such directory (a launch.train "
                    f"workdir, its checkpoints/, a global bucket URL, or hf:DIR)")
  if key and not is_bucket(source):
    raise InitError("train.init_public_key verifies a global round: it needs "
                    "train.init_from to be a global bucket URL")
  if key:
    try:
      trust.parse_public_key(key, what="train.init_public_key")
    except trust.TrustError as e:
      raise InitError(str(e)) from None
