"""Any model this project makes, from one string: its config, params and tokenizer.

  WORKDIR[@STEP]        a `launch.train` workdir (config.json, checkpoints/): the latest
                        checkpoint's params, or checkpoint STEP's
  .../sites/NAME[@STEP] a federation site's workdir (its checkpoints; no config.json, so
                        the federation's config, `config`, says what NAME trains)
  URL[@ROUND]           a federation's global bucket (file://, gs://, s3://): committed
                        global round ROUND (default: the one LATEST names), verified like
                        `train.init_from` verifies it (`init_from.read_global_params`); a
                        round does not record its model, so `config` gives it
  hf:DIR                a Hugging Face Llama directory (`launch.export`, `tapestry_jax.hf`)

Data flow: spec -> `load` -> `Loaded` (params on one device) -> evaluation, sampling.
Anything unusable is one line: ModelSourceError (or the data pipeline's DataError).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import ml_collections

import data_pipelines
from tapestry_jax import checkpoint
from tapestry_jax import init_from
from tapestry_jax import model


class ModelSourceError(ValueError):
  """A model spec names nothing loadable (missing, no checkpoint, bad round or signature)."""


@dataclasses.dataclass
class Loaded:
  name: str                       # short label for tables (e.g. the workdir's basename, "global@r75")
  model_cfg: model.ModelConfig
  params: Any                     # pytree of jax arrays, as the model's forward takes them
  tokenizer: Any                  # a data_pipelines.tokenizers Tokenizer (encode/decode)
  data_cfg: ml_collections.ConfigDict | None  # the run's `data` section when known, else None


_AT = re.compile(r"^(.+)@(\d+|latest|LATEST)$")
_KINDS = ("a launch.train workdir, a federation's sites/NAME, a global bucket URL or "
          "hf:DIR")


def load(spec: str, *, config=None, public_key: str = "", name: str = "") -> Loaded:
  """The model `spec` names (module docstring). `config`: a config with `model` and `data`
  sections (a federation's or a run's) for specs that do not record their own;
  `public_key`: the coordinator's key ("ed25519:...") a global round is verified with;
  `name`: the label (default: from the spec)."""
  spec = str(spec)
  if spec.startswith("hf:"):
    return _from_hf(spec, spec[len("hf:"):], name)
  base, at = spec, None
  match = _AT.match(spec)
  if match and not os.path.isdir(os.path.expanduser(spec)):
    base, at = match.group(1), (None if match.group(2).lower() == "latest"
                                else int(match.group(2)))
  if init_from.is_bucket(base):
    return _from_bucket(spec, base, at, config, public_key, name)
  return _from_workdir(spec, base, at, config, name)


def _from_workdir(spec: str, path: str, step: int | None, config, name: str) -> Loaded:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ModelSourceError(f"model {spec!r}: no such directory ({_KINDS})")
  workdir = os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path
  run_cfg = _run_config(spec, workdir, config)
  ckpt_dir = str(run_cfg.get("train", {}).get("checkpoint_dir", "") or "")
  ckpt_dir = ckpt_dir[len("file://"):] if ckpt_dir.startswith("file://") else ckpt_dir
  mcfg = _model_config(spec, run_cfg)
  try:
    params = checkpoint.restore_params(ckpt_dir or path, _abstract_params(mcfg), step=step,
                                       what=f"model {spec!r}")
  except checkpoint.InitError as e:
    raise ModelSourceError(str(e)) from None
  label = os.path.basename(workdir) + ("" if step is None else f"@{step}")
  return Loaded(name or label, mcfg, params, data_pipelines.make_tokenizer(run_cfg.data),
                run_cfg.data)


def _run_config(spec: str, workdir: str, config) -> ml_collections.ConfigDict:
  """The workdir's own config.json; for a federation's sites/NAME, NAME's site config
  (`federation.site_config`) of `config`; else `config` itself."""
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    try:
      with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
      raise ModelSourceError(f"model {spec!r}: cannot read {path}: {e}") from None
  site, parent = os.path.basename(workdir), os.path.basename(os.path.dirname(workdir))
  if config is not None and parent == "sites" and site in config.get("sites", {}):
    from tapestry_jax import federation  # pylint: disable=import-outside-toplevel
    return federation.site_config(config, site)
  if config is not None and "model" in config and "data" in config:
    return config
  raise ModelSourceError(f"model {spec!r}: {workdir} has no config.json, so which model it "
                         f"holds is unknown; pass --config (the config it was trained with)")


def _from_bucket(spec: str, url: str, round_: int | None, config, public_key: str,
                 name: str) -> Loaded:
  if config is None or "model" not in config or "data" not in config:
    raise ModelSourceError(f"model {spec!r}: a global round does not record its model's "
                           f"config; pass --config (the federation's, e.g. "
                           f"experiments/configs/federation.py:debref)")
  mcfg = _model_config(spec, config)
  try:
    params, round_ = init_from.read_global_params(
        url, -1 if round_ is None else round_, public_key, _abstract_params(mcfg),
        where=f"model {spec!r}", key_setting="--public_key")
  except checkpoint.InitError as e:
    raise ModelSourceError(str(e)) from None
  return Loaded(name or f"global@r{round_}", mcfg, params,
                data_pipelines.make_tokenizer(config.data), config.data)


def _from_hf(spec: str, directory: str, name: str) -> Loaded:
  directory = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(directory):
    raise ModelSourceError(f"model {spec!r}: no such directory")
  from tapestry_jax import hf  # pylint: disable=import-outside-toplevel
  mcfg, params, tokenizer = hf.load(directory)
  return Loaded(name or os.path.basename(directory), mcfg, params, tokenizer, None)


def _model_config(spec: str, cfg) -> model.ModelConfig:
  try:
    mcfg = model.ModelConfig.from_config(cfg.model)
    mcfg.validate()
  except (TypeError, ValueError, AttributeError, KeyError) as e:
    raise ModelSourceError(f"model {spec!r}: bad model config: {e}") from None
  return mcfg


def _abstract_params(mcfg: model.ModelConfig):
  """The params' ShapeDtypeStructs, placed on one device (the caller reshards)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(lambda: model.init_params(mcfg, jax.random.key(0)))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                      shapes)
