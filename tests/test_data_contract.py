"""Contract every registered data source must satisfy (through make_dataset).

A partner adding a source adds ONE fixture factory to `FIXTURES` below: a function that
writes tiny input files under `tmp_path` and returns a data config for them.
`test_every_registered_source_has_a_fixture` fails until they do.
"""

import collections
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipelines as dp
from data_pipelines import registry
from data_pipelines import tokenizers

SEQ_LEN = 32
BATCH = 4
_WORDS = ("alpha", "beta", "gamma", "delta", "Straße", "café", "東京", "数据", "données",
          "ελληνικά", "русский", "한국어", "かな", "हिंदी", "naïve", "ok")


def fixture_texts(n: int, seed: int = 0) -> list[str]:
  """n distinct multilingual documents, some shorter and some longer than SEQ_LEN."""
  rng = random.Random(seed)
  docs = []
  for i in range(n):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 30))]
    docs.append(f"doc{i}: " + " ".join(words))
  return docs


def _config(**overrides) -> dict:
  cfg = dp.default_config()
  cfg.seq_len = SEQ_LEN
  cfg.prefetch_threads = 2
  cfg.prefetch_buffer = 4
  cfg.eval_fraction = 0.25
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _synthetic(tmp_path):
  del tmp_path
  cfg = _config()
  cfg.synthetic.num_documents = 16
  cfg.synthetic.languages = "latin,kana,hangul"
  return cfg


def _text_files(tmp_path):
  for f in range(3):
    docs = fixture_texts(12, seed=f)
    (tmp_path / f"part{f}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
  return _config(source="text_files", paths=str(tmp_path / "part*.txt"))


def _jsonl(tmp_path):
  for f in range(2):
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False)
             for i, t in enumerate(fixture_texts(15, seed=10 + f))]
    (tmp_path / f"shard{f}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return _config(source="jsonl", paths=str(tmp_path / "*.jsonl"))


def _parquet(tmp_path):
  for f in range(2):
    table = pa.table({"body": fixture_texts(15, seed=20 + f), "n": list(range(15))})
    pq.write_table(table, tmp_path / f"shard{f}.parquet")
  return _config(source="parquet", paths=str(tmp_path / "*.parquet"), field="body")


def _array_record(tmp_path):
  tok = tokenizers.ByteTokenizer()
  for f in range(2):
    dp.write_array_record(str(tmp_path / f"shard{f}.array_record"),
                          [tok.encode(t) for t in fixture_texts(15, seed=30 + f)])
  return _config(source="array_record", paths=str(tmp_path / "*.array_record"))


# Source name -> fixture factory. ADD ONE ENTRY PER NEW SOURCE.
FIXTURES = {
    "synthetic": _synthetic,
    "text_files": _text_files,
    "jsonl": _jsonl,
    "parquet": _parquet,
    "array_record": _array_record,
}


def test_every_registered_source_has_a_fixture():
  missing = set(dp.source_names()) - set(FIXTURES)
  assert not missing, f"add a contract fixture to FIXTURES for: {sorted(missing)}"


@pytest.fixture(params=sorted(FIXTURES))
def cfg(request, tmp_path):
  return FIXTURES[request.param](tmp_path)


def _take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def _doc_tokens(cfg, split):
  """Each document of `split` as its full token sequence with BOS/EOS."""
  tok = dp.make_tokenizer(cfg)
  source = registry.get_source(cfg.source)(cfg)
  docs = source.documents(split)
  out = []
  for i in range(len(docs)):
    ids = np.asarray(docs[i]) if source.pretokenized else tok.encode(docs[i])
    out.append(np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32))
  return out


def _pieces_of_docs(docs):
  """Multiset of (inputs, targets) pieces the pipeline should produce from `docs`."""
  pieces = collections.Counter()
  for t in docs:
    for s in range(0, len(t) - 1, SEQ_LEN):
      p = t[s:s + SEQ_LEN + 1]
      pieces[(tuple(p[:-1]), tuple(p[1:]))] += 1
  return pieces


def _pieces_of_batches(batches):
  """Multiset of (inputs, targets) pieces found in packed batches, by segment."""
  pieces = collections.Counter()
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        pieces[(tuple(b["inputs"][r][m]), tuple(b["targets"][r][m]))] += 1
  return pieces


def _assert_batch_contract(b, tok):
  assert set(b) == {"inputs", "targets", "segment_ids", "positions", "target_bytes"}
  for k, v in b.items():
    assert isinstance(v, np.ndarray) and v.dtype == np.int32, k
    assert v.shape == (BATCH, SEQ_LEN), (k, v.shape)
  seg, pos = b["segment_ids"], b["positions"]
  valid = seg > 0
  for r in range(BATCH):
    # Segments are numbered 1..k left to right; padding (0) only after the last one.
    s = seg[r]
    n = int(valid[r].sum())
    assert (s[:n] > 0).all() and (s[n:] == 0).all()
    assert (np.diff(s[:n]) >= 0).all() and (n == 0 or s[0] == 1)
    assert set(np.unique(s[:n])) == set(range(1, int(s[:n].max(initial=0)) + 1))
    # Positions restart at 0 at each segment start and count up inside it.
    starts = np.r_[True, s[1:n] != s[:n - 1]] if n else np.zeros(0, bool)
    assert (pos[r][:n][starts] == 0).all()
    assert (pos[r][1:n][~starts[1:]] == pos[r][:n - 1][~starts[1:]] + 1).all()
    # Targets are the inputs shifted by one within a segment.
    same = (s[1:n] == s[:n - 1])
    assert (b["inputs"][r][1:n][same] == b["targets"][r][:n - 1][same]).all()
  for k in ("inputs", "targets", "positions", "target_bytes"):
    assert (b[k][~valid] == 0).all(), f"{k} not zero on padding"
  assert (b["target_bytes"] == np.where(valid, tok.token_bytes[b["targets"]], 0)).all()
  assert (b["inputs"][valid] != tok.pad_id).all()
  assert b["targets"].max() < tok.vocab_size


def test_batches_have_the_contract_shapes_and_structure(cfg):
  tok = dp.make_tokenizer(cfg)
  for split, n in (("train", 6), ("eval", 2)):
    for b in _take(dp.make_dataset(cfg, split=split, batch_size=BATCH), n):
      _assert_batch_contract(b, tok)


def test_same_seed_same_batches_other_seed_other_order(cfg):
  a = _take(dp.make_dataset(cfg, split="train", batch_size=BATCH, seed=3), 5)
  b = _take(dp.make_dataset(cfg, split="train", batch_size=BATCH, seed=3), 5)
  c = _take(dp.make_dataset(cfg, split="train", batch_size=BATCH, seed=4), 5)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any((x["inputs"] != z["inputs"]).any() for x, z in zip(a, c))


@pytest.mark.parametrize("split,skip", [("train", 3), ("train", 0), ("eval", 1)])
def test_state_round_trip_reproduces_next_batches(cfg, split, skip):
  ds = dp.make_dataset(cfg, split=split, batch_size=BATCH)
  it = iter(ds)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # Must survive a JSON checkpoint.
  assert len(json.dumps(state)) < 1000, "iterator state should hold no buffers"
  expected = [next(it) for _ in range(2)]
  restored = iter(dp.make_dataset(cfg, split=split, batch_size=BATCH))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_eval_is_one_pass_over_exactly_the_eval_documents(cfg):
  eval_docs = _doc_tokens(cfg, "eval")
  batches = list(dp.make_dataset(cfg, split="eval", batch_size=BATCH))
  assert _pieces_of_batches(batches) == _pieces_of_docs(eval_docs)
  # Every byte of eval text is counted once in target_bytes (BOS is never a target).
  tok = dp.make_tokenizer(cfg)
  assert sum(int(b["target_bytes"].sum()) for b in batches) == sum(
      int(tok.token_bytes[t[1:]].sum()) for t in eval_docs)


def test_train_and_eval_are_disjoint(cfg):
  train_docs = {tuple(t) for t in _doc_tokens(cfg, "train")}
  eval_docs = {tuple(t) for t in _doc_tokens(cfg, "eval")}
  assert train_docs and eval_docs
  assert not train_docs & eval_docs
  # And the train stream is made of train pieces only.
  train_pieces = _pieces_of_docs([np.asarray(t) for t in train_docs])
  seen = _pieces_of_batches(_take(dp.make_dataset(cfg, split="train", batch_size=BATCH), 8))
  assert seen and set(seen) <= set(train_pieces)
