"""Site checkpoints: train state and data-iterator position saved together by Orbax.

A checkpoint step holds two items: `state` (params, optimizer state, step, PRNG key;
sharded arrays written by every process) and `data` (each process's grain iterator
position). Orbax finalises a step only when all items are written, so a restored
checkpoint always pairs a model with the exact data position that produced it.
Restoring takes an abstract target carrying the *current* mesh's shardings, so a
checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def _restore_args(abstract_state) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


class Checkpointer:
  """Async Orbax checkpoints with a save interval and a keep policy."""

  def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
    directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={
            # Storage formats stated explicitly (STACK_NOTES.md): OCDBT + zarr3.
            "state": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator, force: bool = False,
           meta: dict | None = None) -> bool:
    """Saves if `step` is on the interval (or `force`). The iterator's position is read
    now, before this call returns, so the caller may keep iterating. `meta` is a small
    JSON dict kept in the same step (e.g. a federated site's round bookkeeping)."""
    items = dict(state=ocp.args.PyTreeSave(state),
                 data=grain.checkpoint.CheckpointSave(data_iterator))
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_meta(self, step: int) -> dict | None:
    """The `meta` dict saved with `step`, or None if that step has none."""
    if "meta" not in self._manager.item_metadata(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores `state` onto the shardings in `abstract_state` and positions the
    iterator in place. Returns the restored state."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=_restore_args(abstract_state),
                                data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def restore_state(self, step: int, abstract_state):
    """Restores only the train state (e.g. to inspect or re-shard a checkpoint)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=_restore_args(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until background saves are durable; raises if one failed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class InitError(ValueError):
  """`train.init_from` names no usable checkpoint (missing, empty, or another model)."""


def checkpoint_dir(path: str) -> str:
  """The Orbax directory behind `path`: a `launch.train` workdir (its checkpoints/) or
  the checkpoints directory itself."""
  path = os.path.abspath(os.path.expanduser(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def restore_params(path: str, abstract_params):
  """The params of the latest checkpoint step under `path` (`checkpoint_dir`), restored
  onto the shardings of `abstract_params` (ShapeDtypeStructs, any mesh); the optimizer
  state, step and data position of that run are not read. InitError, one line, if there
  is no checkpoint or it does not hold these params."""
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise InitError(f"train.init_from={path!r}: no such directory")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                      save_interval_steps=0),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True),
                     "data": grain.checkpoint.CheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      raise InitError(f"train.init_from={path!r}: no checkpoint in {directory} (a "
                      f"launch.train workdir or its checkpoints/ directory)")
    target = {"params": abstract_params}
    try:  # Orbax would read a slice of a bigger array: compare the stored shapes first.
      stored = manager.item_metadata(step)["state"]["params"]
      stored = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), dict(stored))
    except Exception as e:  # noqa: BLE001
      raise InitError(f"train.init_from={path!r}: step {step} has no params: "
                      f"{str(e).splitlines()[0][:300]}") from None
    want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract_params)
    if stored != want:
      raise InitError(f"train.init_from={path!r}: step {step} holds params of another "
                      f"model (names, shapes or dtypes differ from model.*)")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
    except Exception as e:  # noqa: BLE001  (Orbax raises many types for a mismatch)
      raise InitError(f"train.init_from={path!r}: step {step} does not hold this model's "
                      f"params: {str(e).splitlines()[0][:300]}") from None
    return restored["state"]["params"]
  finally:
    manager.close()
