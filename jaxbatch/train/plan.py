"""Ahead-of-time plan of a run: per-device memory, FLOPs and collectives, without running it.

The train step of ``loop.build`` is lowered on ``jax.ShapeDtypeStruct`` state and batch carrying
their shardings and compiled (``jax.jit(step).lower(...).compile()``); nothing is allocated. The
numbers come from two sources:

- state bytes per device = Σ_leaves prod(shard_shape) · itemsize (``parallel.bytes_per_device``),
  split into parameters, optimizer state (with the accumulators of ``optim.accumulate``), model EMA
  and other state (batch-norm statistics, step, rng, noise EMAs);
- the compiled program: ``memory_analysis()`` (argument, output, aliased and temporary bytes) and
  the collectives counted in ``as_text()``;
- FLOPs: ``cost_analysis()['flops']`` of the step lowered with its loops (micro-batches, scanned
  layers) unrolled, since XLA counts a loop body once.

Peak bytes per device = arguments + outputs − aliased (the donated state is updated in place) +
temporaries (activations kept for the backward pass, gradients, workspace).

Run it through the CLI, which sets the number of simulated devices before JAX starts::

  jaxbatch plan --config configs/imagenet_resnet50_lars.py --devices 256
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from jaxbatch import parallel
from jaxbatch.train import loop, shapes

COLLECTIVES: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one device holds and does in one train step (all byte counts per device).

    Attributes:
      devices: number of devices of the mesh.
      mesh: {'data', 'fsdp', 'tensor'} axis sizes.
      batch_size: global batch of one step.
      per_device_batch: batch_size / (data × fsdp).
      micro_batches: gradient-accumulation micro-batches per step.
      param_bytes: parameters.
      opt_state_bytes: optimizer state (moments, momenta, accumulators).
      ema_bytes: model EMA (0 without EMA).
      other_state_bytes: model state (batch-norm statistics), step, rng, noise-scale EMAs.
      batch_bytes: the device's slice of the input batch.
      argument_bytes: compiled arguments (state + batch).
      output_bytes: compiled outputs (new state + metrics).
      alias_bytes: outputs written in place of donated arguments.
      temp_bytes: temporaries: activations, gradients, workspace.
      flops: floating-point operations of one step divided by the number of devices
        (``step_flops``: XLA cost analysis of the step with its loops unrolled).
      collectives: number of each collective op in the compiled program.
      remat: the model's rematerialisation choices (:func:`remat_summary`).
      context: the sequence split (:func:`context_summary`): 'none', or the strategy, layout and
        tokens per device of a mesh 'context' axis > 1.
    """

    devices: int
    mesh: dict[str, int]
    batch_size: int
    per_device_batch: int
    micro_batches: int
    param_bytes: int
    opt_state_bytes: int
    ema_bytes: int
    other_state_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    collectives: dict[str, int]
    remat: str = "none"
    context: str = "none"

    @property
    def state_bytes(self) -> int:
        """Parameters + optimizer state + EMA + other state."""
        return self.param_bytes + self.opt_state_bytes + self.ema_bytes + self.other_state_bytes

    @property
    def peak_bytes(self) -> int:
        """arguments + outputs − aliased + temporaries: the step's peak footprint."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def parse_bytes(text: str) -> int:
    """Parses a size such as '16GiB', '80GB', '512MiB' or '1000000' into bytes.

    Raises:
      ValueError: a number or unit that cannot be read.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"memory size {text!r}; expected a number with an optional unit from "
            f"{sorted(u for u in _UNITS if u)} (e.g. '16GiB')"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Number of each op of ``COLLECTIVES`` in an HLO module's text (async starts count once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _COLLECTIVE_RE.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


def abstract_inputs(run: loop.Run, example: dict[str, jax.ShapeDtypeStruct]) -> tuple[Any, Any]:
    """(state, batch) of ``run`` as ``ShapeDtypeStruct`` trees carrying their shardings."""
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        run.abstract_state,
        run.state_shardings,
    )
    batch = {
        f: jax.ShapeDtypeStruct(
            (run.cfg.batch_size, *example[f].shape), example[f].dtype, sharding=run.batch_sharding
        )
        for f in run.task.fields
    }
    return state, batch


def build_abstract(
    cfg: ml_collections.ConfigDict, *, devices: Sequence[jax.Device] | None = None
) -> tuple[loop.Run, Any, Any]:
    """The run of ``cfg`` built from its example shapes (no data read), and its abstract inputs."""
    example = shapes.example_shapes(cfg)
    run = loop.build(cfg, train_data=shapes.zero_examples(example), devices=devices)
    state, batch = abstract_inputs(run, example)
    return run, state, batch


def lower_step(
    cfg: ml_collections.ConfigDict,
    *,
    devices: Sequence[jax.Device] | None = None,
    lowering_platforms: Sequence[str] | None = None,
) -> tuple[loop.Run, jax.stages.Lowered]:
    """The run of ``cfg`` (built from shapes) and its train step lowered on abstract inputs.

    Args:
      cfg: a training config.
      devices: as in :func:`plan`.
      lowering_platforms: platforms to lower for, e.g. ``('tpu',)`` or ``('cuda',)`` to inspect
        from a CPU host the program a pod would compile (its Pallas custom calls, collectives);
        default the devices' own platform. The task still makes its choices (``Task.choices``)
        for ``jax.default_backend()``.
    """
    run, state, batch = build_abstract(cfg, devices=devices)
    traced = run.train_step.trace(state, batch)
    if lowering_platforms is None:
        return run, traced.lower()
    return run, traced.lower(lowering_platforms=tuple(lowering_platforms))


def plan(
    cfg: ml_collections.ConfigDict,
    *,
    devices: Sequence[jax.Device] | None = None,
    with_flops: bool = True,
) -> Plan:
    """Compiles the train step of ``cfg`` ahead of time and accounts for its memory and work.

    Args:
      cfg: a training config (its ``mesh`` section picks the mesh over ``devices``).
      devices: the devices of the mesh; default all (the CLI simulates ``--devices`` of them).
      with_flops: also count the step's FLOPs (a second, unrolled lowering); False gives NaN.

    Returns:
      The :class:`Plan` of one step.
    """
    run, state, batch = build_abstract(cfg, devices=devices)
    compiled = run.train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    param = parallel.bytes_per_device(state.params)
    opt = parallel.bytes_per_device(state.opt_state)
    ema = 0 if state.ema_state is None else parallel.bytes_per_device(state.ema_state)
    total_state = parallel.bytes_per_device(state)
    mesh = {k: int(v) for k, v in run.mesh.shape.items()}
    return Plan(
        devices=run.mesh.devices.size,
        mesh=mesh,
        batch_size=run.cfg.batch_size,
        per_device_batch=run.cfg.batch_size // parallel.batch_axis_size(run.mesh),
        micro_batches=run.cfg.micro_batches,
        param_bytes=param,
        opt_state_bytes=opt,
        ema_bytes=ema,
        other_state_bytes=total_state - param - opt - ema,
        batch_bytes=parallel.bytes_per_device(batch),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=(
            step_flops(cfg, devices=devices) / run.mesh.devices.size if with_flops else float("nan")
        ),
        collectives=count_collectives(compiled.as_text()),
        remat=remat_summary(cfg.model.to_dict()),
        context=context_summary(run.cfg, mesh),
    )


def context_summary(cfg: ml_collections.ConfigDict, mesh: dict[str, int]) -> str:
    """'none', or e.g. 'ring (zigzag) over context=8: 131072 tokens, 16384 per device'."""
    context = int(mesh.get("context", 1))
    if context == 1:
        return "none"
    strategy = cfg.model.get("context_parallel", "none")
    layout = cfg.model.get("context_layout", "contiguous")
    seq_len = cfg.dataset.options.get("seq_len", cfg.model.get("max_len"))
    text = f"{strategy} ({layout}) over context={context}"
    if seq_len:
        text += f": {seq_len} tokens, {seq_len // context} per device"
    return text


_REMAT_KEYS = ("remat_policy", "backprop")


def remat_summary(model: dict[str, Any]) -> str:
    """The model's remat choices, from its config section (and its towers').

    Reads ``remat_policy`` (a name of ``jaxbatch.nn.remat.POLICY_NAMES``, or one per ResNet stage)
    and ``backprop`` ('full', 'remat', 'streambp') wherever they are set, prefixed by the path of
    the sub-model that sets them: 'remat_policy=full', or 'x_encoder.remat_policy=full,
    y_encoder.remat_policy=none' for a dual encoder. 'none' when nothing is set.
    """
    found = []

    def walk(section: dict[str, Any], prefix: str) -> None:
        for key in _REMAT_KEYS:
            if key in section:
                value = section[key]
                if isinstance(value, list | tuple):
                    value = "(" + ", ".join(str(v) for v in value) + ")"
                found.append(f"{prefix}{key}={value}")
        for key, value in section.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(model, "")
    return ", ".join(found) if found else "none"


def _unrolled(section: dict) -> dict:
    out = {}
    for key, value in section.items():
        if key == "scan_layers":
            value = False
        out[key] = _unrolled(value) if isinstance(value, dict) else value
    return out


def step_flops(
    cfg: ml_collections.ConfigDict, *, devices: Sequence[jax.Device] | None = None
) -> float:
    """Floating-point operations of one train step over all devices (XLA cost analysis).

    XLA's cost analysis counts the body of a loop once, whatever its trip count, so the step is
    lowered (not compiled) with its loops unrolled: one micro-batch (the accumulation loop) and
    ``scan_layers=False`` (the layer loop); flops = flops(one micro-batch step) × micro_batches.
    """
    flat = ml_collections.ConfigDict(cfg.to_dict())
    flat.batch_size = cfg.batch_size // cfg.micro_batches
    flat.micro_batches = 1
    flat.model = ml_collections.ConfigDict(_unrolled(cfg.model.to_dict()))
    run, state, batch = build_abstract(flat, devices=devices)
    cost = run.train_step.lower(state, batch).cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returns one dict per program
        cost = cost[0] if cost else {}
    return float(cost.get("flops", float("nan"))) * cfg.micro_batches


def with_per_device_batch(cfg: ml_collections.ConfigDict, per_device: int, batch_shards: int):
    """A copy of ``cfg`` whose global batch is ``per_device`` × ``batch_shards`` (data × fsdp)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    if per_device < 1 or per_device % cfg.micro_batches:
        raise ValueError(
            f"per-device batch {per_device} must be a positive multiple of "
            f"config.micro_batches={cfg.micro_batches}"
        )
    out.batch_size = per_device * batch_shards
    out.total_samples = max(cfg.total_samples, out.batch_size)
    if out.schedule.warmup_samples >= out.total_samples:
        out.total_samples = out.schedule.warmup_samples + out.batch_size
    return out


def largest_fitting_batch(
    cfg: ml_collections.ConfigDict,
    per_device_batches: Sequence[int],
    budget_bytes: int,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[list[Plan], int | None]:
    """Plans ``cfg`` at each per-device batch; returns (plans, largest batch whose peak fits).

    Args:
      cfg: a training config.
      per_device_batches: candidate batches per device (global = b × data × fsdp).
      budget_bytes: memory of one device.
      devices: as in :func:`plan`.

    Returns:
      The plans in the given order, and the largest per-device batch with peak ≤ budget (None
      when none fits).
    """
    mesh = parallel.make_mesh(**cfg.mesh.to_dict(), devices=devices)
    shards = parallel.batch_axis_size(mesh)
    plans = [
        plan(with_per_device_batch(cfg, b, shards), devices=devices) for b in per_device_batches
    ]
    return plans, largest_within(plans, budget_bytes)


def largest_within(plans: Sequence[Plan], budget_bytes: int) -> int | None:
    """The largest per-device batch among ``plans`` whose peak fits ``budget_bytes``, or None."""
    fitting = [p.per_device_batch for p in plans if p.peak_bytes <= budget_bytes]
    return max(fitting) if fitting else None


def format_bytes(n: float) -> str:
    """Bytes in binary units: '812 B', '3.50 MiB', '12.25 GiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(p: Plan, *, title: str = "") -> str:
    """A human-readable table of one plan."""
    mesh = " × ".join(f"{k}={v}" for k, v in p.mesh.items())
    rows = [
        ("devices", f"{p.devices} (mesh {mesh})"),
        (
            "batch",
            f"{p.batch_size} global, {p.per_device_batch} per device, "
            f"{p.micro_batches} micro-batch(es)",
        ),
        ("parameters", format_bytes(p.param_bytes)),
        ("optimizer state", format_bytes(p.opt_state_bytes)),
        ("model EMA", format_bytes(p.ema_bytes)),
        ("other state", format_bytes(p.other_state_bytes)),
        ("input batch", format_bytes(p.batch_bytes)),
        ("temporaries (activations, grads)", format_bytes(p.temp_bytes)),
        ("peak (args + out - alias + temp)", format_bytes(p.peak_bytes)),
        ("FLOPs per step per device", f"{p.flops:.4g}"),
        ("remat", p.remat),
        ("context parallel", p.context),
        ("collectives", ", ".join(f"{k} {v}" for k, v in p.collectives.items())),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def format_batch_table(plans: Sequence[Plan], budget_bytes: int, best: int | None) -> str:
    """One line per candidate batch: peak bytes and whether it fits ``budget_bytes``."""
    lines = [f"  per-device batch   peak per device   fits {format_bytes(budget_bytes)}"]
    for p in plans:
        fits = "yes" if p.peak_bytes <= budget_bytes else "no"
        lines.append(f"  {p.per_device_batch:>16}   {format_bytes(p.peak_bytes):>15}   {fits}")
    lines.append(
        f"  largest per-device batch that fits: {best}"
        if best is not None
        else "  no candidate batch fits the budget"
    )
    return "\n".join(lines)


def plan_to_dict(p: Plan) -> dict[str, Any]:
    """The plan as JSON-ready values, with the derived totals (and the remat choices)."""
    out = dataclasses.asdict(p)
    out.update(state_bytes=p.state_bytes, peak_bytes=p.peak_bytes)
    return out
