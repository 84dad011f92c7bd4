"""Orbax checkpoints of a run: the train state, the data-iterator state and a model fingerprint.

Each checkpoint step holds three items:

- 'state': the :class:`~jaxbatch.train.step.TrainState` (params, optimizer state, EMA, step, rng),
  saved sharded and restored straight into the target shardings (so a run can move to another mesh);
- 'data':  the grain iterator state (JSON), so a resumed run sees the same batches;
- 'meta':  the fingerprint of the model (task, model config, parameter shapes), checked before the
  state is restored so that a workdir holding another model's checkpoint fails with a clear error
  rather than an obscure shape mismatch deep inside orbax.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: another model's, or unreadable."""


def fingerprint(task_name: str, model_config: dict, abstract_params: Any) -> dict:
    """What identifies the model of a run: its task, config and parameter shapes."""
    shapes = {
        jax.tree_util.keystr(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    return {"task": task_name, "model": model_config, "param_shapes": shapes}


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
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "data", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

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
            saved = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be read ({type(e).__name__}: {e}); "
                "it may be corrupt or from another program: move it away or use another --workdir"
            ) from e
        if saved.get("task") != meta["task"] or saved.get("param_shapes") != meta["param_shapes"]:
            raise CheckpointError(
                f"workdir {epath.Path(self.directory).parent} holds a checkpoint (step {step}) "
                f"of a different model: {_describe_difference(saved, meta)}. Use another --workdir "
                "or remove the old checkpoints."
            )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed in ``abstract_state``'s shardings, data-iterator state) of ``step``."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be restored "
                f"({type(e).__name__}: {e}); it may be corrupt or incomplete"
            ) from e
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
