"""Orbax checkpoints of a state pytree plus a JSON dict, checked against the target before restoring.

Typical use with Flax NNX:
  ckpt = Checkpointer(run_dir / "ckpt")
  ckpt.save(step, {"model": nnx.state(model), "opt": nnx.state(optimizer)}, {"step": step, "config": ...})
  abstract = {"model": nnx.state(nnx.eval_shape(make_model)), "opt": ...}  # shapes, dtypes (and shardings)
  state, extra = ckpt.restore(ckpt.latest_step(), abstract)
  nnx.update(model, state["model"]); nnx.update(optimizer, state["opt"])
Saves are atomic (Orbax writes a temporary directory and renames it), so a run killed mid-save keeps its
previous checkpoint. `save` blocks until the write is done: the caller may donate or overwrite the
buffers right after. Leaves of `abstract_state` that carry a `sharding` are restored with it.
`restore_latest` skips a newest checkpoint that cannot be read (a truncated or missing file) and falls back
to the one before it, with a warning naming both; a checkpoint of another model shape is an error, never
skipped.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _key_str(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """`"a.b.0.value" -> (shape, dtype)` for every array leaf; paths spelled as Orbax names them."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_str(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in leaves if hasattr(leaf, "shape")}


def check_compatible(saved, target, where: str = "checkpoint") -> None:
  """Raises ValueError naming the first leaves whose structure, shape or dtype differ."""
  saved_s, target_s = _flat_shapes(saved), _flat_shapes(target)
  missing = sorted(set(target_s) - set(saved_s))
  extra = sorted(set(saved_s) - set(target_s))
  if missing or extra:
    raise ValueError(f"{where} does not match the target state's structure: leaves missing from the "
                     f"checkpoint {missing[:5]}, leaves only in the checkpoint {extra[:5]}")
  bad = [f"{p}: checkpoint {saved_s[p][0]} {saved_s[p][1]} vs target {target_s[p][0]} {target_s[p][1]}"
         for p in sorted(target_s) if saved_s[p] != target_s[p]]
  if bad:
    raise ValueError(f"{where} does not match the target state (another model shape or dtype?): "
                     f"{len(bad)} mismatching leaves, e.g.\n  " + "\n  ".join(bad[:5]))


class Checkpointer:
  """Keeps the last `max_to_keep` steps of `{state: pytree, extra: JSON dict}` under `directory`."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()},
    )

  def save(self, step: int, state_pytree, extra_json: dict | None = None) -> None:
    self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state_pytree),
                                                       extra=ocp.args.JsonSave(dict(extra_json or {}))))
    self._mngr.wait_until_finished()

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, None when there is none."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def restore(self, step: int, abstract_state) -> tuple[object, dict]:
    """(state, extra) of `step`, after checking the saved shapes and dtypes against `abstract_state`
    (a pytree of arrays or `jax.ShapeDtypeStruct`s, e.g. `nnx.state(nnx.eval_shape(...))`)."""
    if step not in self._mngr.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory!r} "
                              f"(available: {sorted(self._mngr.all_steps())})")
    saved = self._mngr.item_metadata(step)["state"]
    check_compatible(saved, abstract_state, where=f"checkpoint {self.directory}/{step}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           extra=ocp.args.JsonRestore()))
    return out["state"], dict(out["extra"] or {})

  def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
    """(step, state, extra) of the newest checkpoint that reads back whole; None when there is none.
    An unreadable one is skipped with a warning; ValueError where a readable one has other shapes;
    RuntimeError naming each failure where none is readable."""
    failures = []
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        saved = self._mngr.item_metadata(step)["state"]
        if not _flat_shapes(saved):  # its metadata file is gone: Orbax reads back no leaves
          raise FileNotFoundError("the saved state's metadata lists no arrays")
      except Exception as e:  # noqa: BLE001  (Orbax and tensorstore raise many kinds on torn files)
        failures.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
        continue
      check_compatible(saved, abstract_state, where=f"checkpoint {self.directory}/{step}")
      try:
        state, extra = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001
        failures.append(f"step {step}: {type(e).__name__}: {str(e)[:200]}")
        continue
      if failures:
        log.warning("checkpoint %s: skipped unreadable newer checkpoints (%s); restored step %d instead",
                    self.directory, "; ".join(failures), step)
      return step, state, extra
    if failures:
      raise RuntimeError(f"no readable checkpoint in {self.directory!r}: " + "; ".join(failures))
    return None

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
