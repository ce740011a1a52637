"""Site checkpoints: train state and data-iterator position saved together by Orbax.

A checkpoint step holds `state` (params, optimizer state, step, PRNG key; sharded
arrays, every process writes its shards and process 0 commits the step) and the data
position: `streams` (one JSON file per data stream, data_pipelines/shards.py, written by
the process that reads it) or, for a plain grain iterator, `data` (grain's file per
process). Orbax finalises a step only when all items are written, so a restored
checkpoint always pairs a model with the exact data position that produced it.
Restoring takes an abstract target carrying the *current* mesh's shardings and reads the
files of the streams this process now reads, so a checkpoint written on one mesh or
process count restores onto another.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines.errors import DataError
from data_pipelines.shards import StreamsIterator

# Orbax reaches a checkpoint directory through etils.epath (listing, renames, small
# files) and TensorStore (arrays). Orbax 0.12's array writer takes local paths and gs://
# only (its TensorStore spec has the file and gcs drivers), so s3:// fails there even
# where etils can reach S3 (with s3fs).
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://")


class CheckpointDirError(ValueError):
  """A checkpoint directory this installation cannot write (an unsupported URL scheme)."""


def checkpoint_path(directory: str) -> epath.Path | str:
  """A local directory (or file:// URL) made absolute, or a gs:// URL whose filesystem
  etils can open; CheckpointDirError, one line, for anything else."""
  match = _URL.match(directory)
  if not match:
    return os.path.abspath(os.path.expanduser(directory))
  scheme = match.group(1)
  if scheme == "file":
    return os.path.abspath(directory[len("file://"):])
  if scheme != "gs":
    raise CheckpointDirError(
        f"checkpoint directory {directory!r}: {scheme}:// is not supported (Orbax "
        f"{ocp.__version__} writes checkpoint arrays to local paths and gs:// only); "
        f"mount the bucket (e.g. s3fs-fuse, weed mount) and give the mount path")
  try:
    path = epath.Path(directory)
    path.exists()  # Opens the filesystem and the bucket now, not at the first save.
  except Exception as e:  # noqa: BLE001  (each backend raises its own types)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise CheckpointDirError(f"checkpoint directory {directory!r}: cannot open it ({first}); "
                             f"gs:// needs gcsfs (pip install gcsfs) and Google Cloud "
                             f"credentials") from None
  return path


@dataclasses.dataclass
class StreamsSave(ocp.args.CheckpointArgs):
  state: dict[str, Any]  # StreamsIterator.get_state(), read when the save was asked for


@dataclasses.dataclass
class StreamsRestore(ocp.args.CheckpointArgs):
  item: StreamsIterator


class StreamsHandler(ocp.CheckpointHandler):
  """Orbax handler of a StreamsIterator's position: `stream_{s}-of-{S}.json` per stream,
  each written by the one process that reads stream s, read back by whichever process
  reads it now (any process count that divides S)."""

  def save(self, directory: epath.Path, args: StreamsSave) -> None:
    S = args.state["num_streams"]
    for s, state in args.state["streams"].items():
      (directory / f"stream_{s}-of-{S}.json").write_text(json.dumps(state))

  def restore(self, directory: epath.Path, args: StreamsRestore) -> StreamsIterator:
    it = args.item
    S = it.num_streams
    states = {}
    for s in it.streams:
      path = directory / f"stream_{s}-of-{S}.json"
      if not path.exists():
        saved = sorted(p.name for p in directory.iterdir())
        counts = sorted({m.group(1) for m in map(re.compile(r"-of-(\d+)\.json$").search, saved) if m})
        raise DataError(f"the checkpoint's data position has {'/'.join(counts) or 'no'} "
                         f"streams, this run {S}: set data.shards={counts[0] if counts else S} "
                         f"to resume it")
      states[str(s)] = json.loads(path.read_text())
    it.set_state({"num_streams": S, "streams": states})
    return it

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


ocp.args.register_with_handler(StreamsHandler, for_save=True)(StreamsSave)
ocp.args.register_with_handler(StreamsHandler, for_restore=True)(StreamsRestore)


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  return {
      # Storage formats stated explicitly (STACK_NOTES.md): OCDBT + zarr3.
      "state": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True),
      "streams": StreamsHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
  }


def _data_save(data_iterator) -> dict[str, ocp.args.CheckpointArgs]:
  if isinstance(data_iterator, StreamsIterator):
    return {"streams": StreamsSave(data_iterator.get_state())}
  return {"data": grain.checkpoint.CheckpointSave(data_iterator)}


def _data_restore(data_iterator) -> dict[str, ocp.args.CheckpointArgs]:
  if isinstance(data_iterator, StreamsIterator):
    return {"streams": StreamsRestore(data_iterator)}
  return {"data": grain.checkpoint.CheckpointRestore(data_iterator)}


def _restore_args(abstract_state) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


# Orbax numbers its save operations process-wide and reads "the current one" while a save
# starts: two checkpointers starting saves at once from two threads of one process (sites
# run as threads, in tests) would wait on each other's signals. Starts are serialized.
_SAVE_LOCK = threading.Lock()


class CheckpointSaveError(RuntimeError):
  """A checkpoint save that failed (for an async save, in the background): that step was
  not kept. Raised at the first `save` or `wait` after the failure is known."""


class Checkpointer:
  """Async Orbax checkpoints with a save interval and a keep policy.

  `directory` is a local path or a bucket URL (`checkpoint_path`). Every process of a
  multi-process job constructs one and calls every method (Orbax synchronises them);
  the data iterator is a StreamsIterator (saved per stream) or a grain iterator.

  A failed save is never silent: Orbax alone reports a failed background write only at
  the next save that is due (or logs it), so `save` also checks, without waiting, on
  every call, and raises CheckpointSaveError naming the failed step and the latest step
  still kept.
  """

  def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(checkpoint_path(directory), options=options,
                                          item_handlers=_item_handlers())
    self._in_flight: int | None = None  # The step whose save may still be running.

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator, force: bool = False,
           meta: dict | None = None) -> bool:
    """Saves if `step` is on the interval (or `force`). The iterator's position is read
    now, before this call returns, so the caller may keep iterating. `meta` is a small
    JSON dict kept in the same step (e.g. a federated site's round bookkeeping).
    CheckpointSaveError if this save, or an earlier one that has finished, failed."""
    if not (force or self._manager.should_save(step)):
      self.check()
      return False
    self.wait()  # Orbax waits for the previous save here anyway; its failure first.
    items = dict(state=ocp.args.PyTreeSave(state), **_data_save(data_iterator))
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    try:
      with _SAVE_LOCK:
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001  (storage and Orbax raise many types)
      raise self._failed(step, e) from e
    if saved:
      self._in_flight = step
    return saved

  def _failed(self, step: int | None, exc: BaseException) -> CheckpointSaveError:
    why = (str(exc).strip().splitlines() or [""])[0][:300]
    kept = self._manager.latest_step()  # Orbax has dropped the failed step by now.
    what = "a checkpoint" if step is None else f"checkpoint at step {step}"
    return CheckpointSaveError(
        f"{what} failed: {type(exc).__name__}: {why}; the latest "
        f"checkpoint kept is {'none' if kept is None else f'step {kept}'} in "
        f"{self._manager.directory}")

  def check(self) -> None:
    """CheckpointSaveError if the last background save has failed; returns at once while
    it is still running."""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def restore_meta(self, step: int) -> dict | None:
    """The `meta` dict saved with `step`, or None if that step has none."""
    if "meta" not in self._manager.item_metadata(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores `state` onto the shardings in `abstract_state` and positions the
    iterator in place. Returns the restored state."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=_restore_args(abstract_state),
                                      **_data_restore(data_iterator)))
    return restored["state"]

  def restore_state(self, step: int, abstract_state):
    """Restores only the train state (e.g. to inspect or re-shard a checkpoint)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=_restore_args(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until background saves are durable; CheckpointSaveError if one failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failed(step, e) from e

  def close(self) -> None:
    self.wait()
    self._manager.close()


class InitError(ValueError):
  """`train.init_from` names no usable checkpoint (missing, empty, or another model)."""


def checkpoint_dir(path: str) -> str:
  """The Orbax directory behind `path`: a `launch.train` workdir (its checkpoints/) or
  the checkpoints directory itself."""
  path = os.path.abspath(os.path.expanduser(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def restore_params(path: str, abstract_params, *, step: int | None = None,
                   what: str | None = None):
  """The params of checkpoint `step` (default: the latest) under `path`
  (`checkpoint_dir`), restored onto the shardings of `abstract_params`
  (ShapeDtypeStructs, any mesh); the optimizer state, step and data position of that run
  are not read. A federated site's checkpoint (its train state next to its error-feedback
  residual) works too. InitError, one line starting with `what` (default
  "train.init_from=PATH"), if there is no such checkpoint or it does not hold these
  params."""
  what = what or f"train.init_from={path!r}"
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise InitError(f"{what}: no such directory")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                      save_interval_steps=0),
      item_handlers=_item_handlers())
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise InitError(f"{what}: no checkpoint in {directory} (a launch.train workdir or "
                      f"its checkpoints/ directory)")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise InitError(f"{what}: no checkpoint step {step} in {directory} (it has steps "
                      f"{', '.join(map(str, steps))})")
    try:  # Orbax would read a slice of a bigger array: compare the stored shapes first.
      state = manager.item_metadata(step)["state"]
      nested = "params" not in state and "train" in state  # A site's {"train", "residual"}.
      stored = state["train"]["params"] if nested else state["params"]
      stored = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), dict(stored))
    except Exception as e:  # noqa: BLE001
      raise InitError(f"{what}: step {step} has no params: "
                      f"{str(e).splitlines()[0][:300]}") from None
    want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract_params)
    if stored != want:
      raise InitError(f"{what}: step {step} holds params of another model (names, shapes "
                      f"or dtypes differ from model.*)")
    target = {"train": {"params": abstract_params}} if nested else {"params": abstract_params}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
    except Exception as e:  # noqa: BLE001  (Orbax raises many types for a mismatch)
      raise InitError(f"{what}: step {step} does not hold this model's params: "
                      f"{str(e).splitlines()[0][:300]}") from None
    state = restored["state"]
    return state["train"]["params"] if nested else state["params"]
  finally:
    manager.close()
