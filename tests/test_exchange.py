"""Exchange: committed rounds of named arrays, read onto any mesh, verified chunk by chunk."""

import dataclasses
import json

import blake3
import jax
import ml_dtypes
import numpy as np
import pytest

from tapestry_jax import exchange as ex
from tapestry_jax import model, sharding, trees
from tapestry_jax.buckets import Bucket, BucketError

PREFIX = ex.update_prefix(1)
ATTEMPT = ex.new_attempt("test")
DATA = ex.data_prefix(PREFIX, ATTEMPT)  # Where round PREFIX's arrays are written.


def _cfg():
  # The tiny preset has 2 kv heads, which a 4-way tensor axis cannot split; 4 kv heads
  # keep every weight divisible on the 2x4 reader mesh.
  return dataclasses.replace(model.ModelConfig(**model.PRESETS["tiny"]), n_kv_heads=4)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """A tiny LM's params written from an 8-way fsdp mesh and committed as update round 1."""
  cfg = _cfg()
  mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
  params = jax.jit(model.init_params, static_argnums=0,
                   out_shardings=model.param_shardings(cfg, mesh))(cfg, jax.random.key(0))
  flat = trees.flatten(params)
  root = tmp_path_factory.mktemp("exchange") / "site-fr"
  bucket = Bucket(f"file://{root}")
  records = ex.write_arrays(bucket, DATA, flat)
  written_bytes = bucket.bytes_written
  manifest = ex.make_manifest(federation="test", kind="update", round=1, author="fr",
                              attempt=ATTEMPT, arrays=records, base_round=0, tokens=4096, extra={"lr": 0.7})
  ex.write_manifest(bucket, PREFIX, manifest)
  return dict(cfg=cfg, flat=flat, root=root, url=f"file://{root}", records=records,
              written_bytes=written_bytes)


def _expected(flat):
  return {n: (x.shape, x.dtype) for n, x in flat.items()}


def test_records_follow_the_writers_shards(written):
  flat, records = written["flat"], written["records"]
  assert sorted(records) == sorted(flat)
  for name, x in flat.items():
    rec = records[name]
    assert rec["shape"] == list(x.shape) and rec["dtype"] == "float32"
    assert tuple(rec["chunk_shape"]) == x.sharding.shard_shape(x.shape), name
    distinct_shards = {str(s.index) for s in x.addressable_shards}
    assert len(rec["chunk_digests"]) == len(distinct_shards), name
  # Chunk digests are BLAKE3-256 of each chunk's C-order little-endian bytes.
  embed = np.asarray(flat["embed"])  # (384, 128), 8 chunks of (384, 16)
  assert records["embed"]["chunk_digests"][3] == blake3.blake3(
      np.ascontiguousarray(embed[:, 48:64]).astype("<f4").tobytes()).hexdigest()
  # Every distinct shard written once: replicated norms are not written 8 times.
  assert written["written_bytes"] == sum(x.nbytes for x in flat.values())


@pytest.mark.parametrize("reader", ["2x4", "1"])
def test_round_trip_onto_another_mesh(written, reader):
  cfg, flat = written["cfg"], written["flat"]
  if reader == "2x4":
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=4))
  else:
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  shardings = trees.flatten(model.param_shardings(cfg, mesh))
  bucket = Bucket(written["url"])
  manifest = ex.read_manifest(bucket, PREFIX)
  assert manifest["round"] == 1 and manifest["kind"] == "update"
  assert manifest["tokens"] == 4096 and manifest["extra"] == {"lr": 0.7}
  ex.check_schema(manifest, _expected(flat))
  before = bucket.bytes_read
  out = ex.read_arrays(bucket, PREFIX, manifest, shardings)
  assert sorted(out) == sorted(flat)
  for name, x in flat.items():
    assert out[name].sharding == shardings[name], name
    assert out[name].dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(x))
  # Each chunk is read once per array, however many devices need part of it.
  assert bucket.bytes_read - before == sum(x.nbytes for x in flat.values())
  again = ex.read_arrays(bucket, PREFIX, manifest, shardings, verify=False)
  for name, x in flat.items():
    np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(x))


def test_mixed_dtypes_scalars_and_split_chunks():
  rng = np.random.default_rng(0)
  arrays = {
      "w_bf16": rng.normal(size=(37, 5, 3)).astype(ml_dtypes.bfloat16),
      "count": np.array(7, np.int32),
      "ids": np.arange(1000, dtype=np.int32).reshape(100, 10),
      "mask": rng.random((9, 4)) > 0.5,
  }
  bucket = Bucket("memory://test-exchange-dtypes")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for compress in (False, True):
    prefix = ex.global_prefix(int(compress))
    records = ex.write_arrays(bucket, ex.data_prefix(prefix, ATTEMPT), arrays, max_chunk_bytes=64,
                              compress=compress)
    # 64-byte chunks: 5*3 bf16 = 30 bytes per leading row -> 2 rows, 37 rows -> 19 chunks.
    assert records["w_bf16"]["chunk_shape"] == [2, 5, 3]
    assert len(records["w_bf16"]["chunk_digests"]) == 19
    assert records["w_bf16"]["dtype"] == "bfloat16" and records["count"]["chunk_shape"] == []
    ex.write_manifest(bucket, prefix, ex.make_manifest(
        federation="test", kind="global", round=int(compress), author="coord", attempt=ATTEMPT,
        arrays=records))
    manifest = ex.read_manifest(bucket, prefix)
    ex.check_schema(manifest, arrays)
    out = ex.read_arrays(bucket, prefix, manifest, {n: repl for n in arrays})
    for name, a in arrays.items():
      assert out[name].dtype == a.dtype and out[name].shape == a.shape
      np.testing.assert_array_equal(np.asarray(out[name]), a)
  assert ex.committed_rounds(bucket, "global") == [0, 1]


def test_uncommitted_round_is_invisible(tmp_path):
  bucket = Bucket(str(tmp_path / "b"))
  p5 = ex.global_prefix(5)
  records = ex.write_arrays(bucket, ex.data_prefix(p5, ATTEMPT), {"w": np.ones((4, 4), np.float32)})
  assert records["w"]["digest"]
  assert ex.read_manifest(bucket, p5) is None
  assert ex.committed_rounds(bucket, "global") == []
  assert ex.read_latest(bucket) is None
  with pytest.raises(ex.ExchangeError, match="not committed"):
    ex.write_latest(bucket, 5)
  # The manifest alone (crash before COMMIT) is still not a round.
  manifest = ex.make_manifest(federation="t", kind="global", round=5, author="c",
                              attempt=ATTEMPT, arrays=records)
  bucket.write(f"{ex.data_prefix(p5, ATTEMPT)}/manifest.json", json.dumps(manifest).encode())
  assert ex.read_manifest(bucket, p5) is None
  assert ex.uncommitted_attempts(bucket, p5) == [ATTEMPT]
  ex.write_manifest(bucket, p5, manifest)
  assert ex.uncommitted_attempts(bucket, p5) == []
  ex.write_latest(bucket, 5)
  assert ex.read_latest(bucket) == 5
  assert json.loads(bucket.read("LATEST")) == {"kind": "global", "prefix": "rounds/round_000005",
                                               "round": 5}
  assert json.loads(bucket.read(f"{p5}/COMMIT")) == {
      "attempt": ATTEMPT, "manifest_sha256": ex.manifest_digest(manifest)}
  with pytest.raises(ex.ExchangeError, match="not committed"):
    ex.write_latest(bucket, 5, kind="update")  # no update round 5 in this bucket
  # Committed rounds are immutable: the committed attempt cannot be rewritten, and the
  # round cannot be committed again (by anyone, with any attempt).
  with pytest.raises(ex.ExchangeError, match="this attempt is committed"):
    ex.write_arrays(bucket, ex.data_prefix(p5, ATTEMPT), {"w": np.zeros((4, 4), np.float32)})
  with pytest.raises(ex.CommitConflict, match="already committed"):
    ex.write_manifest(bucket, p5, manifest)
  other = ex.new_attempt()
  ex.write_arrays(bucket, ex.data_prefix(p5, other), {"w": np.zeros((4, 4), np.float32)})
  with pytest.raises(ex.CommitConflict):
    ex.write_manifest(bucket, p5, dict(manifest, attempt=other))
  assert ex.read_manifest(bucket, p5) == manifest
  assert ex.uncommitted_attempts(bucket, p5) == [other]
  # LATEST never moves backwards.
  ex.write_latest(bucket, 5)
  records = ex.write_arrays(bucket, ex.data_prefix(ex.global_prefix(3), ATTEMPT),
                            {"w": np.ones((4, 4), np.float32)})
  ex.write_manifest(bucket, ex.global_prefix(3), dict(manifest, round=3, arrays=records))
  ex.write_latest(bucket, 3)
  assert ex.read_latest(bucket) == 5


def _commit_round(bucket, round_):
  prefix = ex.global_prefix(round_)
  records = ex.write_arrays(bucket, ex.data_prefix(prefix, ATTEMPT),
                            {"w": np.full((2,), round_, np.float32)})
  ex.write_manifest(bucket, prefix, ex.make_manifest(
      federation="t", kind="global", round=round_, author="c", attempt=ATTEMPT, arrays=records))


def test_latest_is_never_moved_back_by_a_writer_it_races(tmp_path, monkeypatch):
  """A slower writer of round 3 reads LATEST = 2; before it writes, another writer moves
  LATEST to 4. The slower write must not land (compare-and-swap), so LATEST stays 4."""
  bucket = Bucket(str(tmp_path / "b"))
  for r in (2, 3, 4):
    _commit_round(bucket, r)
  ex.write_latest(bucket, 2)
  read_versioned = Bucket.read_versioned
  raced = []

  def read_then_lose_the_race(self, key):
    out = read_versioned(self, key)
    if key == "LATEST" and not raced:
      raced.append(True)
      ex.write_latest(bucket, 4)  # The other coordinator, between our read and our write.
    return out

  monkeypatch.setattr(Bucket, "read_versioned", read_then_lose_the_race)
  ex.write_latest(bucket, 3)
  assert raced and ex.read_latest(bucket) == 4


def test_create_only_commit_lets_exactly_one_of_racing_writers_commit(tmp_path):
  """Many writers racing to commit one round through create-only writes: one wins."""
  import concurrent.futures
  bucket = Bucket(str(tmp_path / "race"))
  prefix = ex.global_prefix(1)
  manifests = []
  for i in range(8):
    attempt = ex.new_attempt()
    records = ex.write_arrays(bucket, ex.data_prefix(prefix, attempt),
                              {"w": np.full((4,), i, np.float32)})
    manifests.append(ex.make_manifest(federation="t", kind="global", round=1, author="c",
                                      attempt=attempt, arrays=records))

  def commit(m):
    try:
      ex.write_manifest(bucket, prefix, m)
      return m["attempt"]
    except ex.CommitConflict:
      return None

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    won = [a for a in pool.map(commit, manifests) if a is not None]
  assert len(won) == 1
  assert ex.read_manifest(bucket, prefix)["attempt"] == won[0]
  assert len(ex.uncommitted_attempts(bucket, prefix)) == 7


def test_tampered_manifest_is_rejected(tmp_path):
  bucket = Bucket(str(tmp_path / "b"))
  records = ex.write_arrays(bucket, DATA, {"w": np.ones((4, 4), np.float32)})
  ex.write_manifest(bucket, PREFIX, ex.make_manifest(
      federation="t", kind="update", round=1, author="fr", attempt=ATTEMPT, arrays=records,
      tokens=10))
  path = tmp_path / "b" / DATA / "manifest.json"
  path.write_bytes(path.read_bytes().replace(b'"tokens":10', b'"tokens":99'))
  with pytest.raises(ex.ExchangeError, match=r"round updates/round_000001: manifest.json does "
                                             r"not match COMMIT"):
    ex.read_manifest(bucket, PREFIX)
  path.unlink()
  with pytest.raises(ex.ExchangeError, match=r"COMMIT names .*manifest.json, which is missing"):
    ex.read_manifest(bucket, PREFIX)


def test_flipped_byte_in_a_chunk_is_caught(written, tmp_path):
  import shutil
  root = tmp_path / "copy"
  shutil.copytree(written["root"], root)
  chunk_file = root / DATA / "arrays" / "layers" / "wq" / "c" / "0" / "3" / "0" / "0"
  data = bytearray(chunk_file.read_bytes())
  data[-5] ^= 0x01  # uncompressed chunks: the element bytes end the file
  chunk_file.write_bytes(bytes(data))
  bucket = Bucket(str(root))
  manifest = ex.read_manifest(bucket, PREFIX)  # the manifest itself is intact
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  shardings = trees.flatten(model.param_shardings(written["cfg"], mesh))
  with pytest.raises(ex.ExchangeError, match=r"array 'layers/wq' .* chunk \(0, 3, 0, 0\) is "
                                             r"corrupt"):
    ex.read_arrays(bucket, PREFIX, manifest, shardings)
  rec = manifest["arrays"]["layers/wq"]
  with pytest.raises(ex.ExchangeError, match="'layers/wq'.*corrupt"):
    ex.read_block(bucket, DATA, "layers/wq", rec, (slice(0, 4), slice(48, 64), slice(0, 4),
                                                     slice(0, 32)))
  # Without verification the damage goes through unnoticed: that is what verify is for.
  out = ex.read_arrays(bucket, PREFIX, manifest, {"layers/wq": shardings["layers/wq"]},
                       verify=False)
  assert not np.array_equal(np.asarray(out["layers/wq"]), np.asarray(written["flat"]["layers/wq"]))
  # A chunk that disappeared is an error, not zeros.
  chunk_file.unlink()
  with pytest.raises(ex.ExchangeError, match="'layers/wq'.*corrupt"):
    ex.read_arrays(bucket, PREFIX, manifest, {"layers/wq": shardings["layers/wq"]})


def test_schema_mismatches_are_listed(written):
  manifest = ex.read_manifest(Bucket(written["url"]), PREFIX)
  expected = _expected(written["flat"])
  expected.pop("unembed")
  expected["extra_head"] = ((3,), np.float32)
  expected["embed"] = ((384, 64), np.float32)
  expected["final_norm"] = ((128,), jax.numpy.bfloat16)
  with pytest.raises(ex.ExchangeError) as e:
    ex.check_schema(manifest, expected)
  msg = str(e.value)
  assert "schema mismatch in round 1 by 'fr'" in msg
  assert "missing arrays ['extra_head']" in msg and "unexpected arrays ['unembed']" in msg
  assert ("'embed': shape (384, 128) != expected (384, 64) (declares more elements than "
          "expected)") in msg
  assert "'final_norm': dtype float32 != expected bfloat16" in msg


def test_absurd_records_fail_before_reading(written):
  bucket = Bucket(written["url"])
  manifest = ex.read_manifest(bucket, PREFIX)
  expected = _expected(written["flat"])
  for change, why in [
      (dict(chunk_shape=[1 << 40, 16]), "does not fit shape"),
      (dict(shape=[1 << 50, 128]), "sane sizes"),
      (dict(chunk_digests=["00" * 32]), "expected 8 chunk digests"),
      (dict(dtype="float99"), "unknown dtype"),
      (dict(digest="11" * 32), "does not match its chunk digests"),
  ]:
    bad = dict(manifest, arrays=dict(manifest["arrays"], embed=dict(
        manifest["arrays"]["embed"], **change)))
    with pytest.raises(ex.ExchangeError, match=why):
      ex.check_schema(bad, expected)
    with pytest.raises(ex.ExchangeError, match=f"array 'embed'.*{why}"):
      ex.read_arrays(bucket, PREFIX, bad, {"embed": None})


def test_read_errors_name_the_array(written):
  bucket = Bucket(written["url"])
  manifest = ex.read_manifest(bucket, PREFIX)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))
  ns = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
  with pytest.raises(ex.ExchangeError, match="not in the manifest"):
    ex.read_arrays(bucket, PREFIX, manifest, {"nope": ns})
  with pytest.raises(ex.ExchangeError, match=r"'final_norm'.*sharding P\(None, 'tensor'\) "
                                             r"does not fit shape \(128,\)"):
    ex.read_arrays(bucket, PREFIX, manifest, {"final_norm": ns})
  with pytest.raises(ex.ExchangeError, match="'embed'.*cannot open stored array"):
    ex.read_arrays(bucket, ex.update_prefix(2), manifest, {"embed": ns})


def test_iter_blocks_cover_the_array_once_and_reassemble(tmp_path):
  bucket = Bucket(str(tmp_path / "b"))
  a = np.arange(37 * 6 * 4, dtype=np.float32).reshape(37, 6, 4)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=2), devices=jax.devices()[:2])
  spec = jax.sharding.PartitionSpec(None, "tensor")
  x = jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
  records = ex.write_arrays(bucket, DATA, {"a": a, "x": x}, max_chunk_bytes=200)
  assert records["a"]["chunk_shape"] == [2, 6, 4]  # 96 bytes per row
  assert records["x"]["chunk_shape"] == [1, 3, 4]  # 37 rows have no divisor <= 4 but 1
  for name in ("a", "x"):
    rec = records[name]
    for budget in (1, 100, 500, 2000, 1 << 20):
      blocks = list(ex.iter_blocks(rec, budget))
      assert blocks == list(ex.iter_blocks(rec, budget))  # deterministic
      seen = np.zeros(a.shape, np.int32)
      out = np.zeros_like(a)
      for index in blocks:
        seen[index] += 1
        out[index] = ex.read_block(bucket, DATA, name, rec, index)
      assert (seen == 1).all(), (name, budget)
      np.testing.assert_array_equal(out, a)
  assert len(list(ex.iter_blocks(records["a"], 1 << 20))) == 1
  with pytest.raises(ex.ExchangeError, match="not aligned"):
    ex.read_block(bucket, DATA, "a", records["a"], (slice(1, 3), slice(0, 6), slice(0, 4)))
  assert list(ex.iter_blocks({"shape": [], "dtype": "int32", "chunk_shape": [],
                              "chunk_digests": ["0" * 64],
                              "digest": ex.combined_digest(["0" * 64])}, 10)) == [()]


def test_bad_names_and_manifests(tmp_path):
  bucket = Bucket(str(tmp_path / "b"))
  one = np.ones(3, np.float32)
  with pytest.raises(ex.ExchangeError, match="'..'"):
    ex.write_arrays(bucket, PREFIX, {"../escape": one})
  with pytest.raises(ex.ExchangeError, match="must not nest"):
    ex.write_arrays(bucket, PREFIX, {"layers": one, "layers/wq": one})
  with pytest.raises(ex.ExchangeError, match="prefix"):
    ex.write_arrays(bucket, "/abs", {"w": one})
  with pytest.raises(ex.ExchangeError, match="kind"):
    ex.make_manifest(federation="t", kind="delta", round=1, author="a", attempt=ATTEMPT,
                     arrays={})
  with pytest.raises(ex.ExchangeError, match="attempt"):
    ex.make_manifest(federation="t", kind="update", round=1, author="a", attempt="../x",
                     arrays={})
  with pytest.raises(ex.ExchangeError, match="round must be"):
    ex.update_prefix(-1)
  assert ex.update_prefix(12) == "updates/round_000012"
  assert ex.global_prefix(12) == "rounds/round_000012"
  bad = ex.make_manifest(federation="t", kind="update", round=1, author="a", attempt=ATTEMPT,
                         arrays={"w": {"shape": [3]}})
  with pytest.raises(ex.ExchangeError, match="refusing to publish"):
    ex.write_manifest(bucket, PREFIX, bad)
  bucket.write("LATEST", b"garbage")
  with pytest.raises(ex.ExchangeError, match="LATEST is not a round pointer"):
    ex.read_latest(bucket)
  with pytest.raises(BucketError):
    Bucket("nfs://x")


def test_merge_records_from_processes(tmp_path):
  bucket = Bucket(str(tmp_path / "b"))
  rec = ex.write_arrays(bucket, DATA, {"w": np.arange(8, dtype=np.float32)},
                        max_chunk_bytes=8)["w"]
  half = len(rec["chunk_digests"]) // 2
  p0 = dict(rec, chunk_digests=rec["chunk_digests"][:half] + [None] * half, digest=None)
  p1 = dict(rec, chunk_digests=[None] * half + rec["chunk_digests"][half:], digest=None)
  assert ex.merge_records([{"w": p0}, {"w": p1}])["w"] == rec
  assert ex.merge_records([{"w": p0}])["w"]["digest"] is None
  wrong = dict(p1, chunk_digests=["ab" * 32] * (2 * half))
  with pytest.raises(ex.ExchangeError, match="disagree"):
    ex.merge_records([{"w": p0}, {"w": wrong}])
