"""Orbax checkpoints of a run: the train state, the data-iterator state and a model fingerprint.

Each checkpoint step holds three items:

- 'state': the :class:`~jaxbatch.train.step.TrainState` (params, optimizer state, EMA, step, rng),
  saved sharded and restored straight into the target shardings (so a run can move to another mesh);
- 'data':  the grain iterator state (JSON), so a resumed run sees the same batches;
- 'meta':  the fingerprint of the model (task, model config, parameter shapes), checked before the
  state is restored so that a workdir holding another model's checkpoint fails with a clear error
  rather than an obscure shape mismatch deep inside orbax.

Orbax's commit protocol keeps unfinished saves out of :meth:`Checkpointer.all_steps` (their
``*.orbax-checkpoint-tmp-*`` directories are removed when the manager opens), but a committed
checkpoint whose files were damaged later is still listed: :meth:`Checkpointer.restore` then
raises :class:`DamagedCheckpoint` with a one-line cause, and the loop moves the step aside
(:meth:`Checkpointer.move_aside`, never a deletion) and tries the next older one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: another model's, or unreadable."""


class DamagedCheckpoint(CheckpointError):
    """A listed (committed) checkpoint whose files cannot be read; ``cause`` is one line."""

    def __init__(self, step: int, cause: str, message: str):
        super().__init__(message)
        self.step = step
        self.cause = cause


# Where damaged steps are moved: a sibling of the checkpoints directory, outside orbax's view.
DAMAGED_SUFFIX = ".damaged"
_NOISE = re.compile(r"\s*\[(tensorstore_spec|source locations)=.*")


def one_line_cause(error: BaseException, limit: int = 240) -> str:
    """``Type: first line`` of an exception, without tensorstore's spec and source dumps."""
    text = _NOISE.sub("", str(error)).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class _OrbaxReadErrors(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" report of an orbax read task.

    Reading a damaged checkpoint, orbax starts concurrent reads (e.g. of the array metadata) and,
    once one fails, raises without awaiting the others; when those are garbage-collected asyncio
    logs each one's traceback. The failure is already reported, in one line, by
    :class:`DamagedCheckpoint`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Task exception was never retrieved"):
            return True
        if f"{os.sep}orbax{os.sep}" in message:  # "coro=<... defined at .../orbax/..."
            return False
        error = record.exc_info[1] if record.exc_info else None
        tb = getattr(error, "__traceback__", None)
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def _closed_loop_callback(unraisable) -> bool:
    """A native (tensorstore) completion callback that found orbax's event loop already closed:
    ``RuntimeError('Event loop is closed')`` raised in ``call_soon_threadsafe`` called from C."""
    error, tb = unraisable.exc_value, unraisable.exc_traceback
    return (
        isinstance(error, RuntimeError)
        and str(error) == "Event loop is closed"
        and tb is not None
        and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
    )


_leftovers_quieted = False


def _quiet_leftovers_of_failed_reads() -> None:
    """After a failed read: for the rest of the process, drop what orbax's abandoned reads still
    print once they finish (asyncio's unretrieved-task report, tensorstore callbacks into the
    closed loop); everything else reaches the logs and ``sys.unraisablehook`` as before."""
    global _leftovers_quieted
    if _leftovers_quieted:
        return
    _leftovers_quieted = True
    logging.getLogger("asyncio").addFilter(_OrbaxReadErrors())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_damaged_reads():
    """Within: a failed orbax read prints nothing but the caller's one-line report (see
    :class:`_OrbaxReadErrors`, :func:`_quiet_leftovers_of_failed_reads`)."""
    quiet = _OrbaxReadErrors()
    logger = logging.getLogger("asyncio")
    logger.addFilter(quiet)
    try:
        yield
    except Exception:
        _quiet_leftovers_of_failed_reads()
        gc.collect()  # the abandoned tasks, while the filter is on
        raise
    finally:
        logger.removeFilter(quiet)


def _state_digest(abstract_state: Any) -> str:
    """A hash of every leaf's path, shape and dtype of the train state."""
    leaves = [
        f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype}"
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    ]
    return hashlib.sha256(json.dumps(leaves).encode()).hexdigest()[:16]


def fingerprint(
    task_name: str, model_config: dict, abstract_params: Any, abstract_state: Any = None
) -> dict:
    """What identifies the model of a run: its task, config and parameter shapes, and (given
    ``abstract_state``) a digest of the whole train state's structure (optimizer, EMA, guard)."""
    shapes = {
        jax.tree_util.keystr(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    meta = {"task": task_name, "model": model_config, "param_shapes": shapes}
    if abstract_state is not None:
        meta["state_digest"] = _state_digest(abstract_state)
    return meta


def _describe_difference(saved: dict, current: dict) -> str:
    if saved.get("task") != current["task"]:
        return f"task {saved.get('task')!r} != {current['task']!r}"
    saved_shapes, shapes = saved.get("param_shapes", {}), current["param_shapes"]
    missing = sorted(set(shapes) - set(saved_shapes))[:3]
    extra = sorted(set(saved_shapes) - set(shapes))[:3]
    changed = [k for k in shapes if k in saved_shapes and saved_shapes[k] != shapes[k]][:3]
    parts = []
    if missing:
        parts.append(f"parameters not in the checkpoint: {missing}")
    if extra:
        parts.append(f"parameters only in the checkpoint: {extra}")
    if changed:
        parts.append(
            "shapes differ: " + ", ".join(f"{k} {saved_shapes[k]} vs {shapes[k]}" for k in changed)
        )
    if saved.get("model") != current["model"]:
        parts.append(f"model config {saved.get('model')} vs {current['model']}")
    return "; ".join(parts)


class Checkpointer:
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` for one run directory."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
            ),
            item_names=("state", "data", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def move_aside(self, step: int) -> str:
        """Renames checkpoint ``step`` into ``<checkpoints>.damaged/`` (never deletes it).

        Only process 0 renames; every process then waits for it and re-reads the step list.
        Returns the new path.
        """
        root = epath.Path(self.directory)
        aside_root = root.parent / (root.name + DAMAGED_SUFFIX)
        target = aside_root / str(step)
        n = 1
        while target.exists():
            target = aside_root / f"{step}.{n}"
            n += 1
        if jax.process_index() == 0:
            aside_root.mkdir(parents=True, exist_ok=True)
            (root / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxbatch_move_aside_{step}")
        self._manager.reload()
        return str(target)

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Saves asynchronously (the device→host copy happens before this returns)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def check_compatible(self, step: int, meta: dict) -> None:
        """Raises CheckpointError unless checkpoint ``step`` holds the model of ``meta``."""
        try:
            with _quiet_damaged_reads():
                saved = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
        except Exception as e:  # orbax raises many types for unreadable files
            cause = one_line_cause(e)
            raise DamagedCheckpoint(
                step, cause, f"checkpoint {step} in {self.directory} cannot be read ({cause})"
            ) from None
        if saved.get("task") != meta["task"] or saved.get("param_shapes") != meta["param_shapes"]:
            raise CheckpointError(
                f"workdir {epath.Path(self.directory).parent} holds a checkpoint (step {step}) "
                f"of a different model: {_describe_difference(saved, meta)}. Use another --workdir "
                "or remove the old checkpoints."
            )
        if "state_digest" in meta and saved.get("state_digest") != meta["state_digest"]:
            raise CheckpointError(
                f"workdir {epath.Path(self.directory).parent} holds a checkpoint (step {step}) "
                "whose train state (optimizer, EMA or guard state) is laid out differently: the "
                "config changed (e.g. optimizer.name or ema.decay) or an older jaxbatch wrote it. "
                "Use another --workdir, or init_from to take its weights only."
            )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed in ``abstract_state``'s shardings, data-iterator state) of ``step``."""
        try:
            with _quiet_damaged_reads():
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
        except Exception as e:
            cause = one_line_cause(e)
            raise DamagedCheckpoint(
                step, cause, f"checkpoint {step} in {self.directory} cannot be restored ({cause})"
            ) from None
        return restored.state, restored.data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_weights(source: str, abstract_weights: dict, meta: dict) -> dict:
    """Model weights from another run's latest checkpoint, placed in the current shardings.

    Only ``abstract_weights``' entries are read (e.g. {'params': ..., 'model_state': ...}); the
    optimizer state, step and data position of the source run are left on disk. Used to start a
    run from an earlier one (BERT phase 2 from phase 1, fine-tuning).

    Args:
      source: the workdir of the earlier run, or its ``checkpoints`` directory.
      abstract_weights: the entries to read, as ``jax.ShapeDtypeStruct`` trees with shardings.
      meta: this run's :func:`fingerprint`; the source's parameter shapes must equal it.

    Returns:
      The restored entries, as ``abstract_weights``.

    Raises:
      CheckpointError: no checkpoint at ``source``, another model's, or an unreadable one.
    """
    directory = epath.Path(source)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"init_from={source!r}: no such directory")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"init_from={source!r}: no checkpoint in {directory}")
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract_weights
    )
    try:
        saved_meta = manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
    except Exception as e:
        raise CheckpointError(
            f"init_from={source!r}: checkpoint {step} cannot be read ({type(e).__name__}: {e})"
        ) from e
    if saved_meta.get("param_shapes") != meta["param_shapes"]:
        raise CheckpointError(
            f"init_from={source!r}: checkpoint {step} holds a different model: "
            f"{_describe_difference(saved_meta, meta)}"
        )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract_weights, restore_args=restore_args, partial_restore=True
            )
        ),
    ).state
    manager.close()
    return restored
