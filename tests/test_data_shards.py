"""data.shards: the global batch is the same on any process count, and so is its position.

Processes are simulated here (make_iterator's process_index/process_count); the real
multi-process runs are in test_multiprocess.py.
"""

import numpy as np
import pytest

import data_pipelines as dp

GLOBAL = 8


def _cfg(**overrides):
  cfg = dp.default_config()
  cfg.seq_len = 16
  cfg.prefetch_threads = 0
  cfg.prefetch_buffer = 2
  cfg.synthetic.num_documents = 64
  cfg.eval_fraction = 0.2
  cfg.update(overrides)
  return cfg


def _iters(cfg, n, split="train"):
  # Simulated processes cannot run the eval end-of-pass collective: never stop here and
  # let the test stop when every process is exhausted.
  return [dp.make_iterator(cfg, split=split, global_batch_size=GLOBAL, process_index=i,
                           process_count=n, all_done=lambda _: False) for i in range(n)]


def _global(iters):
  """One global batch: the processes' rows in process order (as Trainer.shard_batch)."""
  parts = [next(it) for it in iters]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _state(iters):
  """The states of all processes merged (what the checkpoint's per-stream files hold)."""
  merged = {"num_streams": iters[0].num_streams, "streams": {}}
  for it in iters:
    merged["streams"].update(it.get_state()["streams"])
  return merged


def _assert_same(a, b):
  for k in dp.pipeline.BATCH_KEYS:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_global_batches_and_positions_do_not_depend_on_the_process_count():
  cfg = _cfg(shards=4)
  runs = {n: _iters(cfg, n) for n in (1, 2, 4)}
  steps = {n: [_global(its) for _ in range(3)] for n, its in runs.items()}
  for n in (2, 4):
    for a, b in zip(steps[1], steps[n]):
      _assert_same(a, b)
  assert not np.array_equal(steps[1][0]["inputs"], steps[1][1]["inputs"])
  # Process i owns streams [i*S/n, (i+1)*S/n) and its state names only those.
  assert [it.streams for it in runs[2]] == [(0, 1), (2, 3)]
  assert sorted(runs[2][1].get_state()["streams"]) == ["2", "3"]
  # 2 -> 1 and 1 -> 4: the next batches are the uninterrupted run's.
  following = [_global(runs[1]) for _ in range(2)]
  one = _iters(cfg, 1)
  one[0].set_state(_state(runs[2]))
  four = _iters(cfg, 4)
  for it in four:
    it.set_state(_state(runs[4]))
  for want in following:
    _assert_same(_global(one), want)
    _assert_same(_global(four), want)


def test_default_is_one_stream_per_process_as_before():
  cfg = _cfg()
  (it,) = _iters(cfg, 1)
  ds = iter(dp.make_dataset(cfg, split="train", batch_size=GLOBAL))
  for _ in range(2):
    _assert_same(next(it), next(ds))


def test_eval_batches_do_not_depend_on_the_process_count():
  cfg = _cfg(shards=4)
  passes = {n: [] for n in (1, 2)}
  for n in passes:
    iters = _iters(cfg, n, split="eval")
    while True:
      batch = _global(iters)
      if all(it.exhausted for it in iters):  # A real run stops here (all_done agrees).
        break
      passes[n].append(batch)
  assert len(passes[1]) == len(passes[2]) > 1
  for a, b in zip(passes[1], passes[2]):
    _assert_same(a, b)
  # Streams end at different batches; the ended ones pad (segment_ids 0).
  assert (passes[1][-1]["segment_ids"] == 0).any()
  # One real process stops by itself after the same batches.
  (single,) = [dp.make_iterator(cfg, split="eval", global_batch_size=GLOBAL)]
  assert sum(1 for _ in single) == len(passes[1])


@pytest.mark.parametrize("shards,n,message", [
    (3, 2, r"data.shards=3 is not a multiple of the 2 processes"),
    (0, 3, r"global_batch_size=8 is not divisible by data.shards=3"),
    (-1, 1, r"data.shards must be a non-negative integer"),
])
def test_bad_layouts_are_one_line_errors(shards, n, message):
  with pytest.raises(dp.DataError, match=message):
    dp.make_iterator(_cfg(shards=shards), split="train", global_batch_size=GLOBAL,
                     process_index=0, process_count=n)


def test_a_position_with_another_stream_count_names_the_fix():
  (it,) = _iters(_cfg(shards=2), 1)
  with pytest.raises(dp.DataError, match=r"has 4 streams, this run 2: set data.shards=4"):
    it.set_state(_state(_iters(_cfg(shards=4), 1)))
