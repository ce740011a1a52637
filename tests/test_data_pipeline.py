"""Pipeline behaviour beyond the per-source contract: epochs, sharding, padding, splits."""

import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipelines as dp
from data_pipelines import files
from data_pipelines import pipeline
from data_pipelines import registry
from data_pipelines import train_sentencepiece
from data_pipelines.sources import synthetic


def _cfg(**overrides):
  cfg = dp.default_config()
  cfg.seq_len = 16
  cfg.prefetch_threads = 2
  cfg.prefetch_buffer = 4
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _segments(batches):
  """(inputs, targets) token tuples of every packed segment, in row order."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        out.append((tuple(b["inputs"][r][seg == s]), tuple(b["targets"][r][seg == s])))
  return out


@pytest.mark.parametrize("n_tokens,expected", [
    (2, [(0, 1)]), (16, [(0, 15)]), (17, [(0, 16)]), (18, [(0, 16), (16, 17)]),
    (33, [(0, 16), (16, 32)]), (34, [(0, 16), (16, 32), (32, 33)])])
def test_documents_split_into_overlapping_pieces(n_tokens, expected):
  tokens = np.arange(n_tokens, dtype=np.int32)
  pieces = pipeline._SplitIntoPieces(16).flat_map(tokens)  # pylint: disable=protected-access
  assert [(p["inputs"][0], p["inputs"][-1] + 1) for p in pieces] == expected
  for p in pieces:
    np.testing.assert_array_equal(p["targets"], p["inputs"] + 1)
  # Every token but the first is a target exactly once.
  targets = np.concatenate([p["targets"] for p in pieces])
  np.testing.assert_array_equal(targets, tokens[1:])


def _one_piece_docs(tmp_path, n, seq_len=16):
  """n jsonl documents that byte-tokenize to exactly seq_len + 1 tokens with BOS/EOS,
  each starting with a distinct letter (its id)."""
  docs = [chr(ord("a") + i) * (seq_len - 1) for i in range(n)]
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
  return _cfg(source="jsonl", paths=str(path), eval_fraction=0.0, packing_bins=1)


def test_train_reshuffles_every_epoch(tmp_path):
  n = 10
  cfg = _one_piece_docs(tmp_path, n)
  it = iter(dp.make_dataset(cfg, split="train", batch_size=1))
  order = [chr(next(it)["inputs"][0, 1] - 3) for _ in range(4 * n)]
  epochs = ["".join(order[e * n:(e + 1) * n]) for e in range(4)]
  for epoch in epochs:
    assert sorted(epoch) == [chr(ord("a") + i) for i in range(n)], epochs
  assert len(set(epochs)) == 4, epochs


def test_resume_across_epochs(tmp_path):
  cfg = _one_piece_docs(tmp_path, 7)
  cfg.packing_bins = 3
  ds = dp.make_dataset(cfg, split="train", batch_size=2, seed=5)
  it = iter(ds)
  for _ in range(23):  # Several epochs of 7 documents.
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(6)]
  resumed = iter(ds)
  resumed.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(resumed)["inputs"], w["inputs"])


def test_seed_defaults_to_config_seed(tmp_path):
  cfg = _one_piece_docs(tmp_path, 10)
  cfg.seed = 11
  a = next(iter(dp.make_dataset(cfg, split="train", batch_size=4)))
  b = next(iter(dp.make_dataset(cfg, split="train", batch_size=4, seed=11)))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_processes_read_disjoint_shards_that_cover_the_data(tmp_path, monkeypatch):
  cfg = _cfg()
  cfg.synthetic.num_documents = 40
  cfg.synthetic.languages = "latin,greek"
  whole = _segments(dp.make_dataset(cfg, split="eval", batch_size=3))
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
  shards = []
  for index in (0, 1):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda i=index: i)
    shards.append(_segments(dp.make_dataset(cfg, split="eval", batch_size=3)))
  assert shards[0] and shards[1]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(whole)


def test_eval_pads_the_last_batch_and_stops(tmp_path):
  cfg = _one_piece_docs(tmp_path, 7)
  cfg.eval_fraction = 0.9  # ceil(0.9 * 7) = 7 eval docs: 7 full rows.
  batches = list(dp.make_dataset(cfg, split="eval", batch_size=3))
  assert len(batches) == 3
  assert all(b["inputs"].shape == (3, 16) for b in batches)
  rows = np.concatenate([b["segment_ids"] for b in batches])
  assert (rows[:7] > 0).all() and (rows[7:] == 0).all()
  for k, v in batches[-1].items():
    assert (v[1:] == 0).all(), k


def test_element_spec_matches_batches():
  cfg = _cfg()
  cfg.synthetic.num_documents = 8
  batch = next(iter(dp.make_dataset(cfg, split="train", batch_size=2)))
  spec = dp.element_spec(cfg, 2)
  assert set(spec) == set(batch)
  for k, v in batch.items():
    assert (spec[k].shape, spec[k].dtype) == (v.shape, v.dtype)
  assert isinstance(spec["inputs"], jax.ShapeDtypeStruct)


def test_packing_fills_rows_with_several_short_documents():
  cfg = _cfg(seq_len=256)
  cfg.synthetic.num_documents = 50
  cfg.synthetic.max_sentences = 3
  it = iter(dp.make_dataset(cfg, split="train", batch_size=8))
  batches = [next(it) for _ in range(5)]
  seg = np.concatenate([b["segment_ids"] for b in batches])
  assert seg.max() >= 3  # Rows hold several documents ...
  assert (seg > 0).mean() > 0.8  # ... and are mostly full.


def test_max_documents_per_row_caps_the_packing():
  """cuDNN's packed attention is built for a fixed number of runs per row."""
  cfg = _cfg(seq_len=256, max_documents_per_row=2)
  cfg.synthetic.num_documents = 50
  cfg.synthetic.max_sentences = 3
  it = iter(dp.make_dataset(cfg, split="train", batch_size=8))
  seg = np.concatenate([next(it)["segment_ids"] for _ in range(5)])
  assert seg.max() == 2
  with pytest.raises(dp.DataError, match="max_documents_per_row"):
    dp.validate(_cfg(max_documents_per_row=-1))


# --- split rules ------------------------------------------------------------------------

@pytest.mark.parametrize("data,fraction,cut", [
    (b"aaaa\nbbbb\ncccc\ndddd\n", 0.25, 15),  # Target 15 is a line start.
    (b"aaaa\nbbbb\ncccc\ndddd\n", 0.3, 15),  # Target 14 moves to the next line start.
    (b"aaaa\nbbbb\ncccc\ndddd", 0.1, 19),  # Last line, no final newline: no eval text.
    (b"aaaa\nbbbb\n", 0.0, 10),
    (b"x\n", 0.9, 0)])
def test_eval_cut_is_at_a_line_start(data, fraction, cut):
  assert files.eval_cut_bytes(data, fraction) == cut


@pytest.mark.parametrize("n,fraction,n_eval", [
    (10, 0.1, 1), (30, 0.1, 3), (5, 0.1, 1), (1, 0.1, 1), (7, 0.0, 0), (0, 0.5, 0),
    (100, 0.25, 25)])
def test_eval_record_count(n, fraction, n_eval):
  assert files.eval_record_count(n, fraction) == n_eval


def test_text_files_split_and_document_modes(tmp_path):
  (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n\nfour five\nsix\n")  # 30 bytes
  (tmp_path / "b.txt").write_text("b1\n\nbbb\nb2\n")  # 11 bytes
  paths = str(tmp_path / "*.txt")
  cfg = _cfg(source="text_files", paths=paths, eval_fraction=0.2)
  source = registry.get_source("text_files")(cfg)
  # a.txt: 80% is byte 24, inside "four five\n", so eval starts at the next line (26).
  # b.txt: 80% is byte 8, already a line start.
  assert list(source.documents("train")) == ["one\ntwo", "three", "four five", "b1", "bbb"]
  assert list(source.documents("eval")) == ["six", "b2"]
  cfg.text_documents = "files"
  source = registry.get_source("text_files")(cfg)
  assert list(source.documents("train")) == ["one\ntwo\n\nthree\n\nfour five\n",
                                             "b1\n\nbbb\n"]
  assert list(source.documents("eval")) == ["six\n", "b2\n"]


def test_record_sources_hold_out_the_last_records_of_each_file(tmp_path):
  for f in range(2):
    rows = [f"file{f} row{i}" for i in range(10)]
    pq.write_table(pa.table({"text": rows}), tmp_path / f"{f}.parquet")
    (tmp_path / f"{f}.jsonl").write_text("\n".join(json.dumps({"text": r}) for r in rows))
  for name in ("parquet", "jsonl"):
    cfg = _cfg(source=name, paths=str(tmp_path / f"*.{name}"), eval_fraction=0.2)
    source = registry.get_source(name)(cfg)
    assert list(source.documents("eval")) == [
        "file0 row8", "file0 row9", "file1 row8", "file1 row9"]
    assert len(source.documents("train")) == 16


def test_sentencepiece_target_bytes_count_every_eval_byte(tmp_path):
  corpus = tmp_path / "corpus.txt"
  docs = [synthetic.generate_document(0, i % 2, "train", i) for i in range(60)]
  corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
  model = train_sentencepiece.train([str(corpus)], str(tmp_path / "sp"), 400)
  cfg = _cfg(source="text_files", paths=str(corpus), tokenizer="sentencepiece",
             tokenizer_model=model, seq_len=64)
  source = registry.get_source("text_files")(cfg)
  eval_bytes = sum(len(d.encode()) for d in source.documents("eval"))
  batches = list(dp.make_dataset(cfg, split="eval", batch_size=4))
  assert sum(int(b["target_bytes"].sum()) for b in batches) == eval_bytes
  # Sub-word pieces: clearly fewer tokens than bytes.
  n_targets = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  assert n_targets < 0.6 * eval_bytes
