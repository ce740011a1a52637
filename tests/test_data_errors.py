"""Every bad data input gets a one-line DataError naming the file/line/field."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipelines as dp
from data_pipelines import tokenizers


def _cfg(**overrides):
  cfg = dp.default_config()
  cfg.seq_len = 16
  cfg.prefetch_threads = 1
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _raises(match, fn, *args, **kwargs):
  """Asserts fn raises a one-line DataError whose message matches `match`."""
  with pytest.raises(dp.DataError, match=match) as info:
    fn(*args, **kwargs)
  assert isinstance(info.value, ValueError)
  assert "\n" not in str(info.value), str(info.value)
  return str(info.value)


def _first_batches(cfg, split="train", batch_size=2, n=3):
  it = iter(dp.make_dataset(cfg, split=split, batch_size=batch_size))
  return [next(it) for _ in range(n)]


def _paragraphs(n):
  return "\n\n".join(f"paragraph number {i} with a little text in it" for i in range(n))


# --- config.validate ----------------------------------------------------------------------

def test_unknown_source_lists_known_ones():
  msg = _raises(r"unknown data.source 'csv'; known sources: ", dp.validate,
                _cfg(source="csv"))
  for name in ("array_record", "jsonl", "parquet", "synthetic", "text_files"):
    assert name in msg


def test_unknown_tokenizer():
  _raises(r"unknown data.tokenizer 'bpe'; expected one of byte, sentencepiece",
          dp.validate, _cfg(tokenizer="bpe"))


def test_sentencepiece_needs_a_model_file(tmp_path):
  _raises(r"needs data.tokenizer_model", dp.validate, _cfg(tokenizer="sentencepiece"))
  missing = str(tmp_path / "absent.model")
  _raises(rf"data.tokenizer_model '{missing}': no such file", dp.validate,
          _cfg(tokenizer="sentencepiece", tokenizer_model=missing))


@pytest.mark.parametrize("source", ["text_files", "jsonl", "parquet", "array_record"])
def test_file_sources_need_paths(source):
  _raises(rf"data.paths \(source '{source}'\) is empty", dp.validate, _cfg(source=source))


def test_glob_matching_nothing_is_named(tmp_path):
  (tmp_path / "a.txt").write_text("hello")
  paths = f"{tmp_path}/a.txt,{tmp_path}/nope/*.txt"
  _raises(rf"glob '{tmp_path}/nope/\*.txt' matches no files", dp.validate,
          _cfg(source="text_files", paths=paths))


@pytest.mark.parametrize("seq_len", [0, -3])
def test_bad_seq_len(seq_len):
  _raises(r"data.seq_len must be a positive integer", dp.validate, _cfg(seq_len=seq_len))


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_bad_eval_fraction(fraction):
  _raises(r"data.eval_fraction must be in \[0, 1\)", dp.validate,
          _cfg(eval_fraction=fraction))


def test_bad_text_documents_mode():
  _raises(r"unknown data.text_documents 'lines'", dp.validate, _cfg(text_documents="lines"))


def test_bad_synthetic_languages():
  cfg = _cfg()
  cfg.synthetic.languages = "latin,klingon"
  _raises(r"data.synthetic.languages: unknown language 'klingon'", dp.validate, cfg)
  cfg.synthetic.languages = "latin,0"
  _raises(r"lists 'latin' twice", dp.validate, cfg)


def test_bad_split_and_batch_size():
  _raises(r"unknown split 'test'", dp.make_dataset, _cfg(), split="test", batch_size=2)
  _raises(r"batch_size must be a positive integer", dp.make_dataset, _cfg(),
          split="train", batch_size=0)


# --- file contents ---------------------------------------------------------------------

def test_non_utf8_text_names_file_and_byte_offset(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("good start\n\ncaf".encode() + b"\xe9 au lait\n")
  _raises(rf"{path} is not valid UTF-8: byte offset 15 \(byte 0xe9\)", dp.make_dataset,
          _cfg(source="text_files", paths=str(path)), split="train", batch_size=2)


def test_non_utf8_jsonl(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
  _raises(rf"{path} is not valid UTF-8: byte offset 25", dp.make_dataset,
          _cfg(source="jsonl", paths=str(path)), split="train", batch_size=2)


def test_empty_input_files(tmp_path):
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_text("\n\n  \n")
  _raises(r"no documents in 2 file\(s\)", dp.make_dataset,
          _cfg(source="text_files", paths=str(tmp_path / "*.txt")),
          split="train", batch_size=2)


def test_jsonl_line_that_is_not_json(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n')
  _raises(rf"{path}:3: not valid JSON", dp.make_dataset,
          _cfg(source="jsonl", paths=str(path)), split="train", batch_size=2)


def test_jsonl_line_without_the_field(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"text": "one"}\n{"body": "two", "id": 2}\n')
  _raises(rf"{path}:2: no field 'text' \(data.field\); keys: body, id", dp.make_dataset,
          _cfg(source="jsonl", paths=str(path)), split="train", batch_size=2)
  path.write_text('{"text": "one"}\n["text"]\n')
  _raises(rf"{path}:2: no field 'text'.*not an object", dp.make_dataset,
          _cfg(source="jsonl", paths=str(path)), split="train", batch_size=2)
  path.write_text('{"text": "one"}\n{"text": 7}\n')
  _raises(rf"{path}:2: field 'text' is a JSON int, not a string", dp.make_dataset,
          _cfg(source="jsonl", paths=str(path)), split="train", batch_size=2)


def test_parquet_without_the_column(tmp_path):
  path = tmp_path / "data.parquet"
  pq.write_table(pa.table({"body": ["a b c"] * 5, "n": list(range(5))}), path)
  _raises(rf"{path} has no column 'text' \(data.field\); columns: body, n",
          dp.make_dataset, _cfg(source="parquet", paths=str(path)),
          split="train", batch_size=2)
  _raises(rf"{path}: column 'n' has type int64, not string", dp.make_dataset,
          _cfg(source="parquet", paths=str(path), field="n"), split="train", batch_size=2)


def test_file_that_is_not_parquet(tmp_path):
  path = tmp_path / "data.parquet"
  path.write_text("just text")
  _raises(rf"{path} is not a readable Parquet file", dp.make_dataset,
          _cfg(source="parquet", paths=str(path)), split="train", batch_size=2)


def test_file_that_is_not_array_record(tmp_path):
  path = tmp_path / "data.array_record"
  path.write_text("just text")
  _raises(rf"{path} is not an ArrayRecord file", dp.make_dataset,
          _cfg(source="array_record", paths=str(path)), split="train", batch_size=2)


def test_array_record_with_non_int32_records(tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = tmp_path / "text.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  writer.write("a text record".encode())  # 13 bytes: not int32s.
  writer.close()
  _raises(rf"{path} record 0: 13-byte record is not an int32 token array",
          dp.make_dataset, _cfg(source="array_record", paths=str(path)),
          split="train", batch_size=2)


def test_array_record_bad_record_found_while_streaming(tmp_path):
  """A bad record past the first is reported (file and record) when it is read."""
  path = tmp_path / "docs.array_record"
  docs = [np.arange(3, 40) for _ in range(20)]
  docs[9] = np.array([5, 6, 70000])  # Out of the byte tokenizer's vocabulary.
  dp.write_array_record(str(path), docs)
  cfg = _cfg(source="array_record", paths=str(path), eval_fraction=0.0)
  _raises(rf"{path} record 9: token id 70000 outside the tokenizer's vocabulary "
          r"\[0, 259\)", _first_batches, cfg, n=50)


def test_write_array_record_rejects_non_integer_documents(tmp_path):
  _raises(r"document 1 is not a 1-D integer array", dp.write_array_record,
          str(tmp_path / "x.array_record"), [[1, 2], [0.5, 2.5]])


# --- sizes the data cannot fill ----------------------------------------------------------

def test_empty_eval_split(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text(_paragraphs(20))
  _raises(r"the eval split of data.source 'text_files' is empty \(data.eval_fraction is 0",
          dp.make_dataset, _cfg(source="text_files", paths=str(path), eval_fraction=0.0),
          split="eval", batch_size=2)


def test_split_with_fewer_tokens_than_one_sequence(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text(_paragraphs(20))
  cfg = _cfg(source="text_files", paths=str(path), seq_len=4096)
  msg = _raises(r"the eval split of data.source 'text_files' has only \d+ tokens "
                r"\(with BOS/EOS\), fewer than one sequence of data.seq_len \+ 1 = 4097",
                dp.make_dataset, cfg, split="eval", batch_size=2)
  assert int(msg.split("has only ")[1].split()[0]) < 4097
  _raises(r"the train split .* fewer than one sequence", dp.make_dataset, cfg,
          split="train", batch_size=2)
  # The same data is fine with a sequence length it can fill.
  cfg.seq_len = 16
  assert _first_batches(cfg, split="eval", n=1)[0]["inputs"].shape == (2, 16)


def test_more_processes_than_documents(tmp_path, monkeypatch):
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  path = tmp_path / "a.jsonl"
  path.write_text("\n".join(json.dumps({"text": f"doc {i} " * 9}) for i in range(4)))
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 8)
  monkeypatch.setattr(pipeline.jax, "process_index", lambda: 5)
  _raises(r"the train split .* on process 5 of 8 is empty: fewer documents than "
          r"processes", dp.make_dataset, _cfg(source="jsonl", paths=str(path)),
          split="train", batch_size=2)


def test_tokenizer_model_errors_do_not_leak_library_tracebacks(tmp_path):
  bogus = tmp_path / "x.model"
  bogus.write_text("nope")
  with pytest.raises(dp.DataError) as info:
    tokenizers.SentencePieceTokenizer(str(bogus))
  assert info.value.__cause__ is not None  # Chained, not swallowed.
