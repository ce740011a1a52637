"""Streaming merge: merge_round over stored rounds == outer.outer_step on whole arrays."""

import jax
import numpy as np
import pytest

from tapestry_jax import exchange as ex
from tapestry_jax import merge
from tapestry_jax import outer
from tapestry_jax import outer_config
from tapestry_jax.outer_config import RoundMergeSpec
from tapestry_jax import quantize
from tapestry_jax import update_codecs
from tapestry_jax.buckets import Bucket

# A scalar, an empty array, a vector, rows that no chunk size divides, and a 3-D array.
SHAPES = {"a": (), "b": (0, 5), "c": (7,), "d": (37, 6), "e": (5, 3, 4)}


def _round(tmp_path, tx, rng, quantized=None):
  """A committed global round 0 (params + outer state) and three site updates, each
  written with different chunk sizes so that merge blocks span several chunks
  (`quantized`: as int8 or float8 codes, their records carrying the dequantization, or
  as an `update_codecs.UpdateSpec` encodes them: block-scaled or top-k codes with their
  scales and indices)."""
  glob = Bucket(str(tmp_path / "global"))
  params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  arrays = {f"params/{n}": p for n, p in params.items()}
  for n, p in params.items():
    for leaf, v in outer.state_leaves(jax.device_get(tx.init(p))).items():
      v = np.asarray(v)
      arrays[f"outer/{n}/{leaf}"] = (np.abs(rng.standard_normal(v.shape)).astype(v.dtype)
                                     if v.ndim else v)
  attempt = ex.new_attempt()
  records = ex.write_arrays(glob, ex.data_prefix(ex.global_prefix(0), attempt), arrays,
                            max_chunk_bytes=256)
  ex.write_manifest(glob, ex.global_prefix(0), ex.make_manifest(
      federation="t", kind="global", round=0, author="global", attempt=attempt,
      arrays=records))
  inputs, deltas = [], []
  for k, chunk_bytes in enumerate((128, 512, 300)):
    bucket = Bucket(str(tmp_path / f"site{k}"))
    delta = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    if isinstance(tx, outer.SharedMoments):  # The site's first moments travel along.
      delta.update({ex.MOMENT_PREFIX + n: rng.standard_normal(s).astype(np.float32)
                    for n, s in SHAPES.items()})
    if isinstance(quantized, update_codecs.UpdateSpec):
      delta = {n: update_codecs.to_host(quantized.leaf_codec(
          d.shape, n.startswith(ex.MOMENT_PREFIX)).encode(d)) for n, d in delta.items()}
    elif quantized:
      delta = {n: quantize.quantize(d, quantized) for n, d in delta.items()}
      delta = {n: quantize.Quantized(np.asarray(q.codes), q.offset, q.scale)
               for n, q in delta.items()}
    attempt = ex.new_attempt()
    records = ex.write_arrays(bucket, ex.data_prefix(ex.update_prefix(1), attempt),
                              ex.stored_arrays(delta), max_chunk_bytes=chunk_bytes)
    for n, d in delta.items():
      if isinstance(d, update_codecs.CODED):
        records[n] = dict(records[n], quant=d.params())
    ex.write_manifest(bucket, ex.update_prefix(1), ex.make_manifest(
        federation="t", kind="update", round=1, author=f"s{k}", attempt=attempt,
        arrays=records, base_round=0, tokens=1))
    inputs.append((bucket, ex.update_prefix(1), ex.read_manifest(bucket, ex.update_prefix(1))))
    deltas.append(delta)
  state = {n: outer.state_from_leaves(tx, p, {l: arrays[f"outer/{n}/{l}"]
                                              for l in outer.state_leaves(tx.init(p))})
           for n, p in params.items()}
  # In memory, an update is an outer.Update (the stored layout names moments by prefix).
  updates = [outer.Update({n: v for n, v in d.items() if not n.startswith(ex.MOMENT_PREFIX)},
                          {n[len(ex.MOMENT_PREFIX):]: v for n, v in d.items()
                           if n.startswith(ex.MOMENT_PREFIX)} or None) for d in deltas]
  return glob, inputs, params, state, updates


def _whole(bucket, prefix, name, rec):
  return ex.read_block(bucket, prefix, name, rec, tuple(slice(0, s) for s in rec["shape"]))


def _assert_stored(glob, prefix, records, want_params, want_state):
  """The merged round's stored params and outer state equal `outer_step`'s, bit for bit."""
  for n in SHAPES:
    np.testing.assert_array_equal(
        _whole(glob, prefix, f"params/{n}", records[f"params/{n}"]), want_params[n])
    for leaf, v in outer.state_leaves(want_state[n]).items():
      key = f"outer/{n}/{leaf}"
      np.testing.assert_array_equal(_whole(glob, prefix, key, records[key]), v)


def _outer(name):
  return outer_config.make_outer_optimizer({"name": name, "lr": 1.0, "steps_per_round": 3}
                                           if name == "moments" else {"name": name})


@pytest.mark.parametrize("name", outer_config.OUTER_OPTIMIZERS)
def test_merge_round_is_bit_identical_to_the_whole_outer_step(tmp_path, name):
  tx = _outer(name)
  glob, inputs, params, state, deltas = _round(tmp_path, tx, np.random.default_rng(0))
  weights = outer.cap_weights([1, 2, 3], None)
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights)
  base = ex.read_manifest(glob, ex.global_prefix(0))
  for r, (read_ahead, max_block_bytes) in enumerate([(0, 64), (1, 1000), (2, 1 << 20)]):
    prefix = ex.data_prefix(ex.global_prefix(1 + r), ex.new_attempt())
    records = merge.merge_round(RoundMergeSpec(tx), glob, ex.global_prefix(0), base, inputs,
                                weights, glob, prefix, max_block_bytes=max_block_bytes,
                                read_ahead=read_ahead)
    assert sorted(records) == sorted(base["arrays"])
    _assert_stored(glob, prefix, records, want_params, want_state)


@pytest.mark.parametrize("aggregator", ["mean", "median"])
@pytest.mark.parametrize("dtype", quantize.DTYPES)
def test_quantized_updates_merge_bit_identically_and_clip_by_their_dequantized_norm(
    tmp_path, aggregator, dtype):
  tx = outer_config.make_outer_optimizer({"name": "nesterov"})
  glob, inputs, params, state, deltas = _round(tmp_path, tx, np.random.default_rng(1),
                                               quantized=dtype)
  assert {r["dtype"] for _, _, m in inputs for r in m["arrays"].values()} == {dtype}
  norms = [outer.update_norm(d.delta) for d in deltas]  # what each site declares
  clip = sorted(norms)[1]  # clips one site
  weights = outer.cap_weights([1, 2, 3], None)
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights,
                                             clip_norm=clip, aggregator=aggregator)
  base = ex.read_manifest(glob, ex.global_prefix(0))
  prefix = ex.data_prefix(ex.global_prefix(1), ex.new_attempt())
  records = merge.merge_round(RoundMergeSpec(tx, clip_norm=clip, aggregator=aggregator), glob,
                              ex.global_prefix(0), base, inputs, weights, glob, prefix,
                              max_block_bytes=64, declared_norms=norms)
  _assert_stored(glob, prefix, records, want_params, want_state)
  # A norm declared from the float update, not from what was sent (the codes), is caught.
  lie = list(norms)
  lie[2] *= 1.01
  with pytest.raises(merge.BadUpdate, match="declared norm") as e:
    merge.merge_round(RoundMergeSpec(tx, clip_norm=clip), glob, ex.global_prefix(0), base, inputs,
                      weights, glob, ex.data_prefix(ex.global_prefix(2), ex.new_attempt()),
                      declared_norms=lie)
  assert e.value.index == 2


@pytest.mark.parametrize("aggregator", ["mean", "median"])
def test_shared_moments_merge_quantized_clipped_moments_and_refuse_a_bad_one(tmp_path,
                                                                             aggregator):
  tx = _outer("moments")
  glob, inputs, params, state, deltas = _round(tmp_path, tx, np.random.default_rng(3),
                                               quantized="float8_e4m3fn")
  weights = outer.cap_weights([1, 2, 3], None)
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights,
                                             aggregator=aggregator)
  base = ex.read_manifest(glob, ex.global_prefix(0))
  prefix = ex.data_prefix(ex.global_prefix(1), ex.new_attempt())
  records = merge.merge_round(RoundMergeSpec(tx, aggregator=aggregator), glob, ex.global_prefix(0),
                              base, inputs, weights, glob, prefix, max_block_bytes=64)
  _assert_stored(glob, prefix, records, want_params, want_state)
  for n in SHAPES:  # The merged first moment is the new mu; the count moved by H.
    assert int(_whole(glob, prefix, f"outer/{n}/count", records[f"outer/{n}/count"])) == 3
  # Site 1's first moment of "d" holds a NaN code: that site, not another, is refused.
  bucket, pre, manifest = inputs[1]
  codes = {n: _whole(bucket, ex.data_prefix(pre, manifest), n, r)
           for n, r in manifest["arrays"].items()}
  codes[ex.MOMENT_PREFIX + "d"][5, 2] = np.nan
  attempt = ex.new_attempt()
  recs = ex.write_arrays(bucket, ex.data_prefix(pre, attempt), codes)
  bad = [inputs[0], (bucket, pre, dict(manifest, attempt=attempt, arrays={
      n: dict(r, quant=manifest["arrays"][n]["quant"]) for n, r in recs.items()})), inputs[2]]
  with pytest.raises(merge.NonFiniteUpdate, match="inner_mu/d") as e:
    merge.merge_round(RoundMergeSpec(tx, aggregator=aggregator), glob, ex.global_prefix(0), base,
                      bad, weights, glob, ex.data_prefix(ex.global_prefix(2), ex.new_attempt()))
  assert e.value.index == 1
  # A site clip (from each delta's norm, which is what a site declares) scales that
  # site's moment too: still bit-identical.
  norms = [outer.update_norm(d.delta) for d in deltas]
  clip = sorted(norms)[1]
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights, clip_norm=clip,
                                             aggregator=aggregator)
  prefix = ex.data_prefix(ex.global_prefix(3), ex.new_attempt())
  records = merge.merge_round(RoundMergeSpec(tx, aggregator=aggregator, clip_norm=clip), glob,
                              ex.global_prefix(0), base, inputs, weights, glob, prefix,
                              max_block_bytes=64, declared_norms=norms)
  _assert_stored(glob, prefix, records, want_params, want_state)
  with pytest.raises(ValueError, match="outer clip is not supported"):
    RoundMergeSpec(tx, outer_clip_norm=1.0)  # Refused when the merge settings are built.


@pytest.mark.parametrize("quantized, aggregator, site_clip",
                         [(None, "mean", False), (None, "median", True),
                          ("int8", "mean", True)])
def test_outer_clip_reads_twice_and_stays_bit_identical(tmp_path, quantized, aggregator,
                                                        site_clip):
  """The merged pseudo-gradient's norm is clipped (outer clip): the streaming merge's
  first pass gets the same factor as the whole-array step, so the bits agree. Outer
  AdamW whose decay skips two leaves: each leaf is merged with its own transformation."""
  tx = outer_config.make_outer_optimizer({"name": "adam", "eps": 1e-8, "weight_decay": 0.1,
                                          "weight_decay_exclude": "d, e"})
  assert isinstance(tx, outer.MaskedDecay)
  glob, inputs, params, state, deltas = _round(tmp_path, tx, np.random.default_rng(4),
                                               quantized=quantized)
  norms = [outer.update_norm(d.delta) for d in deltas]
  robust = {"clip_norm": sorted(norms)[1] if site_clip else 0.0, "aggregator": aggregator}
  weights = outer.cap_weights([1, 2, 3], None)
  unclipped, _ = outer.outer_step(tx, params, state, deltas, weights, **robust)
  merged = {n: np.asarray(outer.aggregate_block([d.delta[n] for d in deltas], weights,
                                                scales=outer.clip_scales(
                                                    norms, robust["clip_norm"]),
                                                aggregator=aggregator)) for n in SHAPES}
  norm = np.sqrt(sum(float(np.sum(np.square(m, dtype=np.float64))) for m in merged.values()))
  clip = norm / 3  # bites: the merged step is scaled by 1/3
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights,
                                             outer_clip_norm=clip, **robust)
  assert not np.array_equal(want_params["d"], unclipped["d"])
  base = ex.read_manifest(glob, ex.global_prefix(0))
  prefix = ex.data_prefix(ex.global_prefix(1), ex.new_attempt())
  records = merge.merge_round(RoundMergeSpec(tx, outer_clip_norm=clip, **robust), glob,
                              ex.global_prefix(0), base, inputs, weights, glob, prefix,
                              max_block_bytes=64, declared_norms=norms)
  _assert_stored(glob, prefix, records, want_params, want_state)
  # A bound above the norm changes nothing.
  same, _ = outer.outer_step(tx, params, state, deltas, weights, outer_clip_norm=2 * norm,
                             **robust)
  for n in SHAPES:
    np.testing.assert_array_equal(same[n], unclipped[n])


@pytest.mark.parametrize("outer_clip", [0.0, 1.0])
def test_a_float8_nan_code_is_a_non_finite_update(tmp_path, outer_clip):
  """float8 has NaN codes: a hostile site's NaN is caught like a float update's (also by
  the outer clip's first pass, which reads every update before anything is merged)."""
  tx = outer_config.make_outer_optimizer({"name": "sgd"})
  glob, inputs, *_ = _round(tmp_path, tx, np.random.default_rng(3), quantized=quantize.FP8)
  bucket, prefix, manifest = inputs[1]
  codes = {n: _whole(bucket, ex.data_prefix(prefix, manifest), n, r)
           for n, r in manifest["arrays"].items()}
  codes["d"][5, 2] = np.nan
  attempt = ex.new_attempt()
  records = ex.write_arrays(bucket, ex.data_prefix(prefix, attempt), codes)
  bad = dict(manifest, attempt=attempt, arrays={
      n: dict(r, quant=manifest["arrays"][n]["quant"]) for n, r in records.items()})
  with pytest.raises(merge.NonFiniteUpdate, match="non-finite") as e:
    merge.merge_round(RoundMergeSpec(tx, outer_clip_norm=outer_clip), glob, ex.global_prefix(0),
                      ex.read_manifest(glob, ex.global_prefix(0)),
                      [inputs[0], (bucket, prefix, bad), inputs[2]], [0.3, 0.3, 0.4], glob,
                      ex.data_prefix(ex.global_prefix(1), ex.new_attempt()))
  assert e.value.index == 1


def _rewritten(site_input, edit):
  """(bucket, prefix, manifest) of site_input's update with its arrays changed by `edit`
  (a function of {name: array}), written to a new attempt of the same round."""
  bucket, prefix, manifest = site_input
  arrays = {n: _whole(bucket, ex.data_prefix(prefix, manifest), n, r)
            for n, r in manifest["arrays"].items()}
  edit(arrays)
  attempt = ex.new_attempt()
  records = ex.write_arrays(bucket, ex.data_prefix(prefix, attempt), arrays)
  return bucket, prefix, dict(manifest, attempt=attempt, arrays=records)


def _merge(tx, glob, inputs, weights, **robust):
  return merge.merge_round(RoundMergeSpec(tx, **robust), glob, ex.global_prefix(0),
                           ex.read_manifest(glob, ex.global_prefix(0)), inputs, weights, glob,
                           ex.data_prefix(ex.global_prefix(1), ex.new_attempt()))


@pytest.mark.parametrize("aggregator", ["mean", "median"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_refuses_its_update(tmp_path, aggregator, value):
  """The mean finds it from the merged block's finiteness flag, the median (which can
  sort it out of the result) from scanning every block; either way the site is named."""
  tx = outer_config.make_outer_optimizer({"name": "nesterov"})
  glob, inputs, *_ = _round(tmp_path, tx, np.random.default_rng(4))
  inputs[2] = _rewritten(inputs[2], lambda a: a["e"].__setitem__((4, 2, 3), value))
  with pytest.raises(merge.NonFiniteUpdate, match="array 'e' has non-finite") as e:
    _merge(tx, glob, inputs, [0.3, 0.3, 0.4], aggregator=aggregator)
  assert e.value.index == 2


def test_finite_values_that_overflow_the_merge_refuse_the_largest_update(tmp_path):
  """Finite but huge values pass every per-value check, yet Nesterov's step
  (-lr * (delta + momentum * m)) overflows float32: no global round may hold an Inf, so
  the update with the largest |weight * value| there is refused."""
  tx = outer_config.make_outer_optimizer({"name": "nesterov", "lr": 0.7, "momentum": 0.9})
  glob, inputs, *_ = _round(tmp_path, tx, np.random.default_rng(5))
  inputs[1] = _rewritten(inputs[1], lambda a: a["d"].__setitem__((30, 1), 3e38))
  with pytest.raises(merge.BadUpdate, match="'d' overflows float32 in block") as e:
    _merge(tx, glob, inputs, [0.05, 0.9, 0.05])
  assert e.value.index == 1 and "overflow" in e.value.reason
  # The merge is fine without it (the coordinator refuses it and merges the others).
  _merge(tx, glob, [inputs[0], inputs[2]], [0.5, 0.5])


def test_a_non_finite_previous_global_round_fails_the_merge_not_a_site(tmp_path):
  tx = outer_config.make_outer_optimizer({"name": "sgd"})
  glob, inputs, *_ = _round(tmp_path, tx, np.random.default_rng(6))
  base = ex.read_manifest(glob, ex.global_prefix(0))
  bad_glob = _rewritten((glob, ex.global_prefix(0), base),
                        lambda a: a["params/c"].__setitem__(3, np.inf))[2]
  with pytest.raises(ex.ExchangeError, match="global round .* 'params/c' has non-finite") as e:
    merge.merge_round(RoundMergeSpec(tx), glob, ex.global_prefix(0), bad_glob, inputs,
                      [0.3, 0.3, 0.4], glob, ex.data_prefix(ex.global_prefix(1), ex.new_attempt()))
  assert not isinstance(e.value, merge.BadUpdate)


def test_read_block_into_a_buffer_through_an_open_store(tmp_path):
  bucket = Bucket(str(tmp_path / "b"))
  a = np.arange(37 * 6, dtype=np.float32).reshape(37, 6)
  rec = ex.write_arrays(bucket, "r", {"a": a}, max_chunk_bytes=100)["a"]  # 4-row chunks
  store = ex.open_array(bucket, "r", "a", rec)
  for index in ex.iter_blocks(rec, 200):
    out = np.full(tuple(s.stop - s.start for s in index), -1, np.float32)
    got = ex.read_block(bucket, "r", "a", rec, index, store=store, out=out)
    assert got is out
    np.testing.assert_array_equal(out, a[index])
  with pytest.raises(ex.ExchangeError, match="`out` must be"):
    ex.read_block(bucket, "r", "a", rec, (slice(0, 4), slice(0, 6)),
                  out=np.zeros((4, 5), np.float32))
  with pytest.raises(ex.ExchangeError, match="`out` must be"):
    ex.read_block(bucket, "r", "a", rec, (slice(0, 4), slice(0, 6)), out=np.zeros((4, 6)))
  # A corrupted chunk is still caught when reading into a buffer.
  bad = dict(rec, chunk_digests=["0" * 64] + rec["chunk_digests"][1:])
  bad["digest"] = ex.combined_digest(bad["chunk_digests"])
  with pytest.raises(ex.ExchangeError, match="corrupt"):
    ex.read_block(bucket, "r", "a", bad, (slice(0, 4), slice(0, 6)),
                  out=np.zeros((4, 6), np.float32))


# Block-scaled 4-bit and top-k codes (`update_codecs`): blocks of 4 elements, so SHAPES'
# rows hold one or two; top-k keeps half of every row (d: 3 of 6, e: 2 of 4).
SPECS = {
    "int4": update_codecs.UpdateSpec("int4", block=4),
    "float4": update_codecs.UpdateSpec("float4_e2m1fn", block=4),
    "topk_float32": update_codecs.UpdateSpec("float32", density=0.5),
    "topk_int4": update_codecs.UpdateSpec("int4", "float8_e4m3fn", block=4, density=0.5),
    "topk_float4": update_codecs.UpdateSpec("float4_e2m1fn", "int4", block=4, density=0.5),
}
FEDAVG = {"name": "sgd", "lr": 1.0, "momentum": 0.0}


@pytest.mark.parametrize("outer_name, aggregator", [("fedavg", "mean"), ("nesterov", "median"),
                                                    ("moments", "mean")])
@pytest.mark.parametrize("codes", SPECS)
def test_coded_updates_merge_bit_identically_and_clip_by_their_decoded_norm(
    tmp_path, codes, outer_name, aggregator):
  """merge_round on row-blocks of codes, scales and indices == outer_step on whole leaves,
  bit for bit (FedAvg, DiLoCo's Nesterov, shared moments with first moments sent dense)."""
  tx = outer_config.make_outer_optimizer(FEDAVG) if outer_name == "fedavg" else _outer(outer_name)
  glob, inputs, params, state, deltas = _round(tmp_path, tx, np.random.default_rng(7),
                                               quantized=SPECS[codes])
  arrays = inputs[0][2]["arrays"]
  assert {a["quant"].get("codec") for a in arrays.values() if "quant" in a} >= (
      {"topk"} if "topk" in codes else {SPECS[codes].dtype})
  norms = [outer.update_norm(d.delta) for d in deltas]  # what each site declares
  clip = sorted(norms)[1]  # clips one site
  weights = outer.cap_weights([1, 2, 3], None)
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights,
                                             clip_norm=clip, aggregator=aggregator)
  base = ex.read_manifest(glob, ex.global_prefix(0))
  spec = RoundMergeSpec(tx, clip_norm=clip, aggregator=aggregator)
  for r, max_block_bytes in enumerate((64, 1 << 20)):
    prefix = ex.data_prefix(ex.global_prefix(1 + r), ex.new_attempt())
    records = merge.merge_round(spec, glob, ex.global_prefix(0), base, inputs, weights, glob,
                                prefix, max_block_bytes=max_block_bytes, declared_norms=norms)
    _assert_stored(glob, prefix, records, want_params, want_state)
  # A norm declared from the float update, not from the decoded codes, is caught.
  lie = list(norms)
  lie[2] *= 1.01
  with pytest.raises(merge.BadUpdate, match="declared norm") as e:
    merge.merge_round(spec, glob, ex.global_prefix(0), base, inputs, weights, glob,
                      ex.data_prefix(ex.global_prefix(3), ex.new_attempt()), declared_norms=lie)
  assert e.value.index == 2


def test_topk_updates_under_the_outer_clip_stay_bit_identical(tmp_path):
  tx = outer_config.make_outer_optimizer({"name": "adam", "eps": 1e-8})
  glob, inputs, params, state, deltas = _round(tmp_path, tx, np.random.default_rng(8),
                                               quantized=SPECS["topk_int4"])
  weights = outer.cap_weights([1, 2, 3], None)
  merged = {n: np.asarray(outer.aggregate_block([d.delta[n] for d in deltas], weights))
            for n in SHAPES}
  clip = np.sqrt(sum(float(np.sum(np.square(m, dtype=np.float64))) for m in merged.values())) / 3
  want_params, want_state = outer.outer_step(tx, params, state, deltas, weights,
                                             outer_clip_norm=clip)
  prefix = ex.data_prefix(ex.global_prefix(1), ex.new_attempt())
  records = merge.merge_round(RoundMergeSpec(tx, outer_clip_norm=clip), glob, ex.global_prefix(0),
                              ex.read_manifest(glob, ex.global_prefix(0)), inputs, weights, glob,
                              prefix, max_block_bytes=64)
  _assert_stored(glob, prefix, records, want_params, want_state)


def _recoded(site_input, edit):
  """`_rewritten` keeping the codes' records ("quant"): hostile values a site signs."""
  bucket, prefix, manifest = _rewritten(site_input, edit)
  quant = {n: r["quant"] for n, r in site_input[2]["arrays"].items() if "quant" in r}
  return bucket, prefix, dict(manifest, arrays={
      n: dict(r, **({"quant": quant[n]} if n in quant else {}))
      for n, r in manifest["arrays"].items()})


def _set(name, index, value):
  return lambda a: a[name].__setitem__(index, value)


@pytest.mark.parametrize("codes, edit, reason", [
    ("topk_int4", _set("codec_indices/d", (30, 2), 6), "column index 6 is out of range for 6"),
    ("topk_int4", _set("codec_indices/e", (4, 2, 1), 0), "not strictly increasing"),
    ("topk_float32", lambda a: a["codec_indices/d"].__setitem__(
        (5,), a["codec_indices/d"][5, ::-1].copy()), "not strictly increasing"),
    ("topk_int4", _set("codec_scales/d", (36, 0), np.nan), "scales hold NaN or Inf"),
    ("int4", _set("codec_scales/d", (2, 1), np.inf), "scales hold NaN or Inf"),
    ("float4", _set("codec_scales/c", (1,), -1.0), "scales must be > 0"),
    ("int4", _set("codec_scales/e", (4, 2, 0), 0.0), "scales must be > 0"),
    ("topk_int4", _set("codec_scales/d", (0, 0), 3e38), "decodes beyond float32"),
    ("topk_float32", _set("d", (9, 1), np.nan), "non-finite values in array d"),
], ids=["index_out_of_range", "duplicate_index", "unsorted_indices", "nan_scale", "inf_scale",
        "negative_scale", "zero_scale", "huge_scale", "nan_value"])
@pytest.mark.parametrize("aggregator", ["mean", "median"])
def test_hostile_codes_refuse_their_update_naming_the_site(tmp_path, codes, edit, reason,
                                                           aggregator):
  tx = outer_config.make_outer_optimizer({"name": "nesterov"})
  glob, inputs, *_ = _round(tmp_path, tx, np.random.default_rng(9), quantized=SPECS[codes])
  inputs[1] = _recoded(inputs[1], edit)
  with pytest.raises(merge.BadUpdate) as e:
    _merge(tx, glob, inputs, [0.3, 0.3, 0.4], aggregator=aggregator)
  assert e.value.index == 1 and reason in e.value.reason, e.value.reason
  assert "bucket" in str(e.value) and "\n" not in str(e.value)


def test_codes_laid_out_unlike_their_codec_refuse_their_update_at_planning(tmp_path):
  """Without a schema check: a missing or mis-shaped companion, or a record naming
  another block size than its scales hold, refuses that site before anything is read."""
  tx = outer_config.make_outer_optimizer({"name": "sgd"})
  glob, inputs, *_ = _round(tmp_path, tx, np.random.default_rng(10), quantized=SPECS["topk_int4"])
  bucket, prefix, manifest = inputs[2]
  cases = [
      ({n: r for n, r in manifest["arrays"].items() if n != "codec_indices/d"},
       "'codec_indices/d' is missing"),
      (dict(manifest["arrays"], **{"codec_scales/c": manifest["arrays"]["codec_scales/d"]}),
       r"'codec_scales/c' is float32\[37, 1\]; codec .* needs float32\[2\]"),
      (dict(manifest["arrays"], c=dict(manifest["arrays"]["c"],
                                       quant={"codec": "int4", "block": 2})),
       r"'codec_scales/c' is float32\[2\]; .* needs float32\[4\]"),
      (dict(manifest["arrays"], c=dict(manifest["arrays"]["c"],
                                       quant={"codec": "int4", "block": 0})), "bad codec"),
  ]
  for arrays, match in cases:
    with pytest.raises(merge.BadUpdate, match=match) as e:
      _merge(tx, glob, [*inputs[:2], (bucket, prefix, dict(manifest, arrays=arrays))],
             [0.3, 0.3, 0.4])
    assert e.value.index == 2
