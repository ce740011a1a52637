"""The references a federation is judged against, cached by their exact recipe.

Each site alone and data parallelism over the union of the sites' data
(`simulate.train_alone`, `simulate.train_data_parallel`) do not depend on the outer
algorithm, so a sweep over outer settings pays for them once: their results are stored
in `CACHE_DIR/KIND-KEY.json`, where KEY is the sha256 of everything that decides them
(every site's reference config: model, data with its files' contents instead of their
paths, train, mesh; the reference kind; the jax version; `RECIPE_VERSION`, bumped when
the code changes what a reference computes).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
from absl import logging

from data_pipelines import files as data_files
from data_pipelines.errors import DataError

from tapestry_jax import federation
from tapestry_jax import simulate

RECIPE_VERSION = 1
KINDS = ("alone", "data_parallel")
# Train fields a reference's result does not depend on: the references train without
# checkpoints, progress bars or evaluations on the way (`simulate.train_alone`, `simulate.
# train_data_parallel`), so a federation's round length (checkpoint_every = H) does not
# split the cache.
_IRRELEVANT = ("checkpoint_every", "keep_checkpoints", "async_checkpoints", "progress_bar",
               "eval_every", "log_every")


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/tapestry_jax/references (default ~/.cache/...)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "tapestry_jax", "references")


def recipe(config, kind: str) -> dict[str, Any]:
  """Everything that decides reference `kind` of `config`, as plain JSON."""
  if kind not in KINDS:
    raise ValueError(f"unknown reference {kind!r}; one of {', '.join(KINDS)}")
  sites = {}
  for name in sorted(federation.site_names(config)):
    c = federation.site_config(config, name, reference=True).to_dict()
    for key in _IRRELEVANT:  # A reference neither checkpoints nor evaluates on the way.
      c["train"].pop(key, None)
    if c["data"].get("paths"):  # The files' contents, not where this checkout keeps them.
      c["data"]["paths"] = _contents(c["data"]["paths"])
    sites[name] = {k: c[k] for k in ("model", "data", "train", "mesh")}
  return {"kind": kind, "sites": sites, "version": RECIPE_VERSION, "jax": jax.__version__,
          "devices": [jax.default_backend(), jax.device_count()]}


def _contents(paths: str) -> list[str]:
  """The sha256 of every file `paths` (data.paths globs) names, in the data's order; the
  globs themselves when they match nothing (the reference then fails with the data
  pipeline's own error)."""
  try:
    files = data_files.expand_paths(paths, "data.paths")
  except DataError:
    return [paths]
  out = []
  for path in files:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    out.append(h.hexdigest())
  return out


def key(config, kind: str) -> str:
  """The sha256 (hex) of `recipe(config, kind)`."""
  text = json.dumps(recipe(config, kind), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _compute(config, kind: str, workdir: str) -> dict[str, dict]:
  fn: Callable = simulate.train_alone if kind == "alone" else simulate.train_data_parallel
  return fn(config, workdir)


def reference(config, kind: str, workdir: str, cache_dir: str | None = None) -> dict[str, dict]:
  """Site -> held-out metrics of reference `kind` ("alone" or "data_parallel"): read from
  `cache_dir` when a run with the same recipe stored it there, else computed (in
  `workdir`) and stored. `cache_dir` None or "": always computed, nothing stored."""
  if not cache_dir:
    return _compute(config, kind, workdir)
  path = os.path.join(cache_dir, f"{kind}-{key(config, kind)[:32]}.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
      if stored.get("recipe") == json.loads(json.dumps(recipe(config, kind), default=str)):
        logging.info("reference %s: cached in %s (computed %s)", kind, path, stored.get("date"))
        return stored["results"]
    except (OSError, ValueError, KeyError):
      pass  # An unreadable or foreign entry is recomputed and replaced.
  t0 = time.perf_counter()
  results = _compute(config, kind, workdir)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump({"recipe": recipe(config, kind), "results": results,
               "seconds": time.perf_counter() - t0,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1, default=str)
  os.replace(tmp, path)  # Atomic: a concurrent reader sees the old entry or the new one.
  return results
