"""Held-out loss, perplexity and bits per byte of any model on text files or a source's
split, computed by the trainer's own eval step, so the numbers are the ones training
reports.

Data flow: `model_source.Loaded` -> a Trainer on this host's devices (its eval step only)
-> for each `Data`: a text file's documents or a registered source's split ->
`data_pipelines.pack_documents` (the eval split's treatment: one ordered pass) with the
model's own tokenizer -> `train.eval_sums`, stopped at `max_tokens` targets -> per-data
and overall sums -> `summarize`. Deterministic: same model, data and settings, same
numbers. One process (a multi-host model is evaluated on one host's devices).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

import data_pipelines
from data_pipelines import DataError
from data_pipelines import files
from data_pipelines import registry
from data_pipelines.sources import text_files
from tapestry_jax import model_source
from tapestry_jax import sharding
from tapestry_jax import train as train_lib
from tapestry_jax.validate import ConfigError

OVERALL = "overall"
# The Trainer wants a train section; evaluation only uses its eval step.
_EVAL_ONLY_TRAIN = dict(microbatches=1, optimizer="sgd", lr=0.0, schedule="constant",
                        warmup_steps=0, steps=1, min_lr_ratio=1.0, grad_clip=0.0)


@dataclasses.dataclass(frozen=True)
class Data:
  """One row of the results: a text file (plain or .xz), or a registered source's split
  read with each model's own data config."""
  name: str
  path: str = ""
  source: str = ""
  split: str = "eval"


def data_list(paths: Sequence[str] = (), source: str = "", split: str = "eval") -> list[Data]:
  """A Data per file the globs in `paths` match (comma-separated globs allowed; a file
  matched twice counts once), then `source`'s `split`. DataError (one line) for a glob
  matching nothing, an unknown source or split."""
  found = [p for pattern in paths for p in files.expand_paths(pattern, what="--data")]
  out = [Data(name=p, path=p) for p in dict.fromkeys(found)]
  if source:
    registry.get_source(source)  # An unknown name fails here, listing the known ones.
    registry.check_split(split)
    out.append(Data(name=f"{source}:{split}", source=source, split=split))
  if not out:
    raise DataError("nothing to evaluate on: give text files (--data) or a source (--source)")
  return out


def evaluate(loaded: model_source.Loaded, data: Sequence[Data], *, seq_len: int = 0,
             batch_size: int = 8, max_tokens: int = 0,
             devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """`loaded`'s metrics on each of `data` and overall (the sums of all of them).

  seq_len: tokens per row (0: the model's data config's, else the data default);
  batch_size: rows per eval step (a multiple of the device count); max_tokens: at most
  this many target tokens per data, the first ones in batch order (0: all; `truncated`
  says whether any were left out); devices: default this host's.
  Returns {"name", "seq_len", "batch_size", "max_tokens", "results": {data name:
  metrics}, "overall": metrics}, metrics being loss (nats/token), perplexity,
  bits_per_byte, tokens, bytes and truncated."""
  data_cfg = _data_config(loaded, seq_len)
  if loaded.tokenizer.vocab_size > loaded.model_cfg.vocab_size:
    raise ConfigError(f"{loaded.name}: the tokenizer has {loaded.tokenizer.vocab_size} ids, "
                      f"the model's vocabulary {loaded.model_cfg.vocab_size}")
  if max_tokens < 0:
    raise ConfigError(f"max_tokens must be >= 0, got {max_tokens}")
  trainer = _trainer(loaded.model_cfg, batch_size, devices)
  params = jax.device_put(loaded.params, trainer.param_shardings)
  results, totals = {}, {}
  with jax.set_mesh(trainer.mesh):
    for d in data:
      budget = _Budget(max_tokens)
      it = iter(_batches(d, data_cfg, loaded.tokenizer, batch_size))
      try:
        sums = train_lib.eval_sums(trainer, params, budget.take(it))
      finally:
        if hasattr(it, "close"):
          it.close()
      results[d.name] = summarize(sums, budget.truncated)
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + v
  overall = summarize(totals, any(r["truncated"] for r in results.values()))
  return {"name": loaded.name, "seq_len": int(data_cfg.seq_len), "batch_size": batch_size,
          "max_tokens": max_tokens, "results": results, "overall": overall}


def compare(specs: Sequence[str], data: Sequence[Data], *, config=None, public_key: str = "",
            **kwargs) -> list[dict[str, Any]]:
  """`evaluate` of every model spec (`model_source.load`), one model in memory at a time."""
  out = []
  for spec in specs:
    loaded = model_source.load(spec, config=config, public_key=public_key)
    out.append(dict(spec=spec, **evaluate(loaded, data, **kwargs)))
    del loaded
  return out


def summarize(sums: dict[str, float], truncated: bool = False) -> dict[str, Any]:
  """Loss, perplexity, bits per byte, tokens and bytes of `eval_sums` sums
  (`train.summarize_eval`, so the same numbers as training's)."""
  s = train_lib.summarize_eval(sums)
  return {"loss": s["eval_loss"], "perplexity": s["eval_perplexity"],
          "bits_per_byte": s["eval_bits_per_byte"], "tokens": int(round(sums["tokens"])),
          "bytes": int(round(sums["bytes"])), "truncated": bool(truncated)}


def table(models: Sequence[dict[str, Any]]) -> str:
  """A fixed-width table of `evaluate` results: a row per data (and overall), a column
  group per model; '*' marks a count cut at max_tokens."""
  group = f"{'loss':>8} {'perplexity':>10} {'bits/byte':>9} {'tokens':>11}"
  width = len(group)
  names = list(models[0]["results"]) + [OVERALL] if models else [OVERALL]
  first = max(len("data"), *(len(n) for n in names))
  clip = lambda s: s if len(s) <= width else "..." + s[-(width - 3):]  # noqa: E731
  lines = [" " * first + "".join(f" | {clip(m['name']):<{width}}" for m in models),
           f"{'data':<{first}}" + f" | {group}" * len(models)]
  lines.append("-" * len(lines[-1]))
  for n in names:
    cells = []
    for m in models:
      r = m["overall"] if n == OVERALL else m["results"][n]
      tokens = f"{r['tokens']}{'*' if r['truncated'] else ' '}"
      ppl = f"{r['perplexity']:.2f}" if r["perplexity"] < 1e6 else f"{r['perplexity']:.3e}"
      cells.append(f"{r['loss']:>8.4f} {ppl:>10} {r['bits_per_byte']:>9.4f} {tokens:>11}")
    if n == OVERALL:
      lines.append("-" * len(lines[1]))
    lines.append(f"{n:<{first}}" + "".join(f" | {c}" for c in cells))
  cut = sorted({m["max_tokens"] for m in models if m["overall"]["truncated"]})
  if cut:
    lines.append(f"* truncated: only the first {', '.join(map(str, cut))} tokens per data "
                 f"(max_tokens)")
  settings = [f"seq_len {m['seq_len']}, batch_size {m['batch_size']}" for m in models]
  if len(set(settings)) == 1:
    lines.append(settings[0])
  else:
    lines.append("; ".join(f"{m['name']}: {s}" for m, s in zip(models, settings)))
  return "\n".join(l.rstrip() for l in lines)


def write_json(path: str, data: Sequence[Data], models: Sequence[dict[str, Any]]) -> None:
  """`compare`'s results as JSON: {"data": [Data fields], "models": [results]}."""
  with open(path, "w") as f:
    json.dump({"data": [dataclasses.asdict(d) for d in data], "models": list(models)}, f,
              indent=2)


# ----------------------------------------------------------------------------- helpers


def _data_config(loaded: model_source.Loaded, seq_len: int) -> ml_collections.ConfigDict:
  """The model's own data section (a copy), or the default one; `seq_len` if given."""
  base = loaded.data_cfg if loaded.data_cfg is not None else data_pipelines.default_config()
  cfg = ml_collections.ConfigDict(base.to_dict())
  if seq_len:
    cfg.seq_len = seq_len
  if not isinstance(cfg.seq_len, int) or cfg.seq_len < 1:
    raise ConfigError(f"seq_len must be a positive integer, got {cfg.seq_len!r}")
  return cfg


def _batches(d: Data, data_cfg: ml_collections.ConfigDict, tokenizer,
             batch_size: int) -> grain.IterDataset:
  """`d`'s batches with `tokenizer`: one ordered pass over every document (of either
  split: the pipeline's eval treatment, which a source's eval split gets in training)."""
  if d.path:
    docs = text_files.text_documents(files.read_utf8(d.path), data_cfg.text_documents)
    if not docs:
      raise DataError(f"{d.path}: no text to evaluate on")
    return data_pipelines.pack_documents(grain.MapDataset.source(docs), data_cfg,
                                         batch_size=batch_size, tokenizer=tokenizer)
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.source = d.source
  data_pipelines.validate(cfg)
  source = registry.get_source(cfg.source)(cfg)
  docs = source.documents(d.split)
  if len(docs) == 0:
    raise DataError(f"the {d.split} split of data.source {d.source!r} is empty")
  return data_pipelines.pack_documents(docs, cfg, batch_size=batch_size, tokenizer=tokenizer,
                                       pretokenized=source.pretokenized)


def _trainer(model_cfg, batch_size: int, devices) -> train_lib.Trainer:
  """A Trainer for the eval step: params sharded over the devices (fsdp), the batch too."""
  devices = list(devices or jax.local_devices())
  n = len(devices)
  if batch_size < 1 or batch_size % n:
    raise ConfigError(f"batch_size={batch_size} must be a positive multiple of the {n} devices")
  if model_cfg.d_model % n:
    raise ConfigError(f"the model's d_model={model_cfg.d_model} is not divisible by the {n} "
                      f"devices (evaluate on fewer: e.g. CUDA_VISIBLE_DEVICES)")
  mesh = sharding.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, devices)
  return train_lib.Trainer(model_cfg, ml_collections.ConfigDict(_EVAL_ONLY_TRAIN), mesh)


class _Budget:
  """Passes batches through until `max_tokens` targets (0: no limit); the batch that
  crosses it keeps only its first targets in row-major order (a prefix of each row, so
  no kept token sees a dropped one), and `truncated` records that tokens were left."""

  def __init__(self, max_tokens: int):
    self.left = max_tokens or math.inf
    self.truncated = False

  def take(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    for batch in batches:
      mask = np.asarray(batch["segment_ids"]) > 0
      n = int(mask.sum())
      if n > self.left:
        self.truncated = True
        if self.left > 0:
          keep = mask & (np.cumsum(mask.ravel()).reshape(mask.shape) <= self.left)
          yield dict(batch, segment_ids=np.where(keep, batch["segment_ids"], 0))
        return
      self.left -= n
      yield batch
