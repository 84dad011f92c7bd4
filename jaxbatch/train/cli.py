"""The ``jaxbatch`` command line.

  jaxbatch train --config configs/NAME.py[:arg] [--config.key=value ...] [--workdir DIR]
  jaxbatch plan  --config configs/NAME.py[:arg] [--config.key=value ...] --devices N
                 [--mesh data=..,fsdp=..,tensor=..] [--batch-sizes 32,64 --memory-budget 16GiB]
                 [--json OUT]

Re-running the same command resumes from the last checkpoint in ``--workdir``; SIGTERM / SIGINT
save the step in progress and exit 0 (``jaxbatch.train.faults``). Exit codes: 0 done or
preempted, 2 a bad config, config file, workdir, dataset or checkpoint (one line on stderr, no run
directory left), 3 a numerical fault that rollbacks did not cure (its report). ``plan`` compiles
the train step ahead of time on N simulated CPU devices and prints per-device memory, FLOPs and
collectives without allocating the model (``jaxbatch.train.plan``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.key=value`` overrides from the other arguments."""
    overrides, rest = [], []
    for arg in argv:
        (overrides if arg.startswith("--config.") else rest).append(arg)
    return overrides, rest


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from jaxbatch import parallel

    parallel.initialize()  # multi-host start (no-op on one process); before jax starts a backend
    from jaxbatch.train import config as config_lib
    from jaxbatch.train import loop

    cfg = config_lib.load_config(args.config, overrides)
    workdir = args.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
    )
    summary = loop.train(cfg, workdir, progress=not args.no_progress)
    summary.pop("state", None)
    import jax

    if jax.process_index() == 0 and "preempted" not in summary:
        print(format_summary(summary, workdir))
    return 0


def _device_flags(devices: int) -> dict[str, str]:
    """Environment that makes JAX start with ``devices`` simulated CPU devices."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def _plan(args: argparse.Namespace, overrides: list[str], argv: Sequence[str]) -> int:
    if args.devices < 1:
        raise ValueError(f"--devices={args.devices}; expected a positive number of devices")
    if "jax" in sys.modules:
        import jax

        if jax.default_backend() != "cpu" or jax.device_count() != args.devices:
            # XLA reads the device count once, when the backend starts: plan in a fresh process.
            import subprocess

            env = {**os.environ, **_device_flags(args.devices)}
            cmd = [sys.executable, "-m", "jaxbatch.train.cli", *argv]
            return subprocess.call(cmd, env=env)
    else:
        os.environ.update(_device_flags(args.devices))
    from jaxbatch import parallel
    from jaxbatch.train import config as config_lib
    from jaxbatch.train import plan as plan_lib

    cfg = config_lib.load_config(args.config, overrides)
    if args.mesh:
        cfg.mesh.update(
            {
                "data": -1,
                "fsdp": 1,
                "context": 1,
                "tensor": 1,
                **parallel.parse_mesh_spec(args.mesh),
            }
        )
    title = f"plan of {args.config} on {args.devices} simulated devices"
    if args.max_seq_len:
        result = _plan_sequence(args, cfg)
    elif args.batch_sizes:
        if not args.memory_budget:
            raise ValueError("--batch-sizes needs --memory-budget (e.g. 16GiB)")
        budget = plan_lib.parse_bytes(args.memory_budget)
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        plans, best = plan_lib.largest_fitting_batch(cfg, sizes, budget)
        for p in plans:
            print(plan_lib.format_plan(p, title=f"{title}, {p.per_device_batch} per device"))
        print(plan_lib.format_batch_table(plans, budget, best))
        result = {"plans": [plan_lib.plan_to_dict(p) for p in plans], "largest_fitting": best}
    else:
        p = plan_lib.plan(cfg)
        print(plan_lib.format_plan(p, title=title))
        if args.memory_budget:
            budget = plan_lib.parse_bytes(args.memory_budget)
            verdict = "fits" if p.peak_bytes <= budget else "does NOT fit"
            print(f"  peak {plan_lib.format_bytes(p.peak_bytes)} {verdict} in {args.memory_budget}")
        result = plan_lib.plan_to_dict(p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": overrides, **result}, f, indent=2)
    return 0


def _plan_sequence(args: argparse.Namespace, cfg) -> dict:
    from jaxbatch.train import plan as plan_lib
    from jaxbatch.train import plan_sequence

    if not args.memory_budget:
        raise ValueError("--max-seq-len needs --memory-budget (e.g. 16GiB)")
    if args.batch_sizes:
        raise ValueError("--max-seq-len and --batch-sizes are separate searches; give one")
    budget = plan_lib.parse_bytes(args.memory_budget)
    modes = [m.strip() for m in (args.backprop or "").split(",") if m.strip()]
    search = dict(multiple=args.seq_multiple, limit=args.seq_limit)
    if modes:
        results = plan_sequence.longest_sequences(cfg, budget, modes, **search)
    else:  # the config's own mode
        mode = cfg.model.get("backprop", "full")
        results = {mode: plan_sequence.longest_fitting_sequence(cfg, budget, **search)}
    print(f"longest sequence of {args.config}, batch {cfg.batch_size}, {args.devices} devices")
    print(plan_sequence.format_sequence_table(results))
    return {m: plan_sequence.search_to_dict(r) for m, r in results.items()}


def format_summary(summary: dict, workdir: str) -> str:
    """The final lines of a run: its eval result, next to the baseline when there is one."""
    lines = [f"done: step {summary['step']}, {summary['samples']} samples; workdir {workdir}"]
    for key in ("eval", "eval_ema", "baseline"):
        if key in summary:
            values = ", ".join(f"{k} {v:.4f}" for k, v in summary[key].items())
            label = {"eval": "model", "eval_ema": "model EMA", "baseline": "lexical TF-IDF"}[key]
            lines.append(f"result ({label}): {values}")
    lines.append("summary: " + json.dumps({k: v for k, v in summary.items()}, default=float))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxbatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) the run of a config")
    train.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    train.add_argument("--workdir", default=None, help="run directory (default runs/<config>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    plan = sub.add_parser("plan", help="compile the train step ahead of time; print memory/FLOPs")
    plan.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    plan.add_argument("--devices", type=int, required=True, help="number of simulated devices")
    plan.add_argument(
        "--mesh", default=None, help="e.g. data=2,fsdp=128,context=1,tensor=1 (else config.mesh)"
    )
    plan.add_argument("--batch-sizes", default=None, help="per-device batches to try, e.g. 32,64")
    plan.add_argument("--memory-budget", default=None, help="bytes per device, e.g. 16GiB")
    plan.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    plan.add_argument(
        "--max-seq-len",
        action="store_true",
        help="search the longest sequence whose step fits --memory-budget (lm, mlm)",
    )
    plan.add_argument(
        "--backprop",
        default=None,
        help="with --max-seq-len: model.backprop modes to compare, e.g. full,remat,streambp",
    )
    plan.add_argument(
        "--seq-multiple", type=int, default=128, help="with --max-seq-len: length granularity"
    )
    plan.add_argument(
        "--seq-limit", type=int, default=1 << 20, help="with --max-seq-len: longest length tried"
    )
    report = sub.add_parser("report", help="plots and a Markdown summary of run directories")
    report.add_argument("workdirs", nargs="+", help="run directories (several overlay)")
    report.add_argument("--out", default=None, help="output directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # no config overrides: the report reads finished run directories
        from jaxbatch.train import report

        return report.main(argv[1:])
    overrides, rest = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    try:
        if args.command == "train":
            return _train(args, overrides)
        if args.command == "plan":
            return _plan(args, overrides, argv)
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        prefix = "jaxbatch: " if code != 2 else "jaxbatch: error: "
        print(prefix + (str(e) if code != 2 else _one_line(e)), file=sys.stderr)
        return code
    return 1


def _exit_code(error: BaseException) -> int | None:
    """2 for an error the user caused (config, workdir, data, checkpoint), 3 for a numerical
    fault that rollbacks did not cure, None for anything else (a bug: its traceback is kept).
    The error classes are imported here, not at the top: importing jax before ``plan`` sets its
    device count would fix the count."""
    from jaxbatch.train.checkpoint import CheckpointError
    from jaxbatch.train.faults import FAULT_EXIT_CODE, TrainingFault

    if isinstance(error, TrainingFault):
        return FAULT_EXIT_CODE
    user = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, CheckpointError)
    return 2 if isinstance(error, user) else None


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
