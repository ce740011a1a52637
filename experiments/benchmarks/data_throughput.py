"""Synthetic corpus throughput: generating documents on the fly against reading them.

  python -m experiments.benchmarks.data_throughput                  # 600 documents, 6 languages
  python -m experiments.benchmarks.data_throughput --documents=3000 --repeats=5

The synthetic source renders each document when the input pipeline asks for it
(`SyntheticSource.documents` is a lazy grain map), so generation runs on the data path.
Measured in this run, over the same documents (all languages, round-robin):

  generate    `synthetic.generate_document` alone: ms per document (target: <= 2 ms, so
              that generation never starves a CPU training step).
  on_the_fly  `pipeline.pack_documents` over the source's lazy documents: tokenize, split,
              pack and batch (data.prefetch_threads reader threads), rendering included.
  baseline    the same `pack_documents` over the same texts rendered beforehand (a list
              in memory): the pipeline's cost without generation.

Each is run once untimed, then timed `--repeats` times (the fastest counts: the machine is
shared). Prints the rates, the ratio on_the_fly / baseline (the share of the pipeline's
throughput kept when it generates its own text) and whether both gave the same batches.
"""

from __future__ import annotations

import json
import os
import time

import grain
import numpy as np
from absl import app, flags

import data_pipelines as dp
from data_pipelines import pipeline
from data_pipelines import tokenizers
from data_pipelines.sources import synthetic

_DOCUMENTS = flags.DEFINE_integer("documents", 600, "Documents per measurement.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per packed row (data.seq_len).")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each (after one untimed).")
_TARGET_MS = flags.DEFINE_float("target_ms", 2.0, "Target: ms per generated document.")
_JSON = flags.DEFINE_string("json_out", "", "Also write the results here.")


def _best_of(fn, repeats: int) -> tuple[float, object]:
  out = fn()  # Warm-up: lexicons, worlds, threads.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return min(times), out


def _batches(documents: grain.MapDataset, cfg, tokenizer) -> list[dict[str, np.ndarray]]:
  return list(pipeline.pack_documents(documents, cfg, batch_size=_BATCH.value,
                                      tokenizer=tokenizer))


def main(argv):
  del argv
  cfg = dp.default_config()
  cfg.seq_len = _SEQ_LEN.value
  n = _DOCUMENTS.value
  lazy = synthetic.SyntheticSource(cfg).documents("train")[:n]
  tokenizer = tokenizers.make_tokenizer(cfg)

  gen_s, texts = _best_of(lambda: [lazy[i] for i in range(n)], _REPEATS.value)
  fly_s, fly = _best_of(lambda: _batches(lazy, cfg, tokenizer), _REPEATS.value)
  memory = grain.MapDataset.source(texts)
  base_s, base = _best_of(lambda: _batches(memory, cfg, tokenizer), _REPEATS.value)

  same = len(fly) == len(base) and all(
      a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
      for a, b in zip(fly, base))
  tokens = sum(int((b["segment_ids"] > 0).sum()) for b in base)
  ms_per_doc = 1e3 * gen_s / n
  result = {
      "documents": n, "bytes_per_document": sum(len(t.encode()) for t in texts) / n,
      "load_average_1min": os.getloadavg()[0],
      "generate_ms_per_document": ms_per_doc, "target_ms_per_document": _TARGET_MS.value,
      "generate_within_target": ms_per_doc <= _TARGET_MS.value,
      "on_the_fly_s": fly_s, "on_the_fly_tokens_per_s": tokens / fly_s,
      "baseline_s": base_s, "baseline_tokens_per_s": tokens / base_s,
      "ratio_on_the_fly_vs_baseline": base_s / fly_s,
      "same_batches": same,
  }
  for k, v in result.items():
    print(f"{k:>30}: {v:.4g}" if isinstance(v, float) else f"{k:>30}: {v}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
