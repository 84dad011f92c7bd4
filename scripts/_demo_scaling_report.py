"""scripts/demo_scaling.py, part 2: metrics over the runs of a seed, their summary over seeds,
and the markdown tables of docs/scaling_demo.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from _demo_scaling_train import OPTIMIZERS, Settings, flat

from jaxbatch import scaling

# ----------------------------------------------------------------------------- metrics


def _distances(run: dict, ref: dict, name: str, ref_name: str) -> np.ndarray:
    """Relative distance of ``run``'s tree ``name`` to ``ref``'s ``ref_name`` at every point."""
    return np.array(
        [
            relative_distance(p["vectors"][name], q["vectors"][ref_name])
            for p, q in zip(run["points"], ref["points"], strict=True)
        ]
    )


def relative_distance(tree: Any, reference: Any) -> float:
    """||tree - reference|| / ||reference|| over all leaves (L2 of the flattened vectors).

    A flat vector (how runs store their parameters) is a tree of one leaf.
    """
    a, b = flat(tree), flat(reference)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _lags(run: dict, name: str) -> np.ndarray:
    """||ema - online|| / ||online|| of ``run`` at every point: how far the EMA trails."""
    return np.array(
        [relative_distance(p["vectors"][name], p["vectors"]["online"]) for p in run["points"]]
    )


def _accs(run: dict, name: str) -> np.ndarray:
    return np.array([p["acc"][name] for p in run["points"]])


def seed_metrics(runs: dict, s: Settings, num_examples: int) -> dict:
    """Distances and accuracies of one seed, at equal samples seen.

    For every optimizer and kappa, with the batch-B run as reference:

    - ``dist_{scaled,unscaled}_{early,end}``: relative L2 distance of the kappa·B run's EMA to
      the batch-B EMA after ``s.early_epochs`` epochs (the first evaluation at or after it)
      and after the last step; ``dist_online_*``: the same for the trained parameters, the
      floor that the trajectories' own divergence sets for any EMA comparison.
    - ``lag_ratio_{scaled,unscaled}``: mean over evaluations of ||ema - online|| / ||online||
      in the kappa·B run, divided by the same for the batch-B run (1 = the EMA trails its
      trajectory by as much as at B; unaffected by the trajectories drifting apart).
    - ``traj_{scaled,unscaled}_{end,max}``: distance of the one-in-kappa EMAs of the batch-B
      trajectory to its every-step EMA (no second training run involved).
    - ``acc_ema_{ref,scaled,unscaled}_{early,end}``: test accuracy of the EMA models;
      ``acc_gap_{scaled,unscaled}_mean``: mean over evaluations of |acc - acc of batch-B EMA|.
    """
    out = {}
    for kind in OPTIMIZERS:
        ref = runs[kind, s.base_batch]
        samples = np.array([p["samples"] for p in ref["points"]])
        early = int(np.argmax(samples >= min(s.early_epochs * num_examples, samples[-1])))
        lag_ref = _lags(ref, "ema_ref").mean()
        acc_ref = _accs(ref, "ema_ref")
        for k in s.kappas:
            run = runs[kind, k * s.base_batch]
            dist = {
                "scaled": _distances(run, ref, "ema_scaled", "ema_ref"),
                "unscaled": _distances(run, ref, "ema_unscaled", "ema_ref"),
                "online": _distances(run, ref, "online", "online"),
            }
            traj = {
                "scaled": _distances(ref, ref, f"traj_scaled_k{k}", "ema_ref"),
                "unscaled": _distances(ref, ref, f"traj_unscaled_k{k}", "ema_ref"),
            }
            m = {"early_samples": int(samples[early]), "acc_ema_ref_early": float(acc_ref[early])}
            m["acc_ema_ref_end"] = float(acc_ref[-1])
            for key, v in dist.items():
                m[f"dist_{key}_early"], m[f"dist_{key}_end"] = float(v[early]), float(v[-1])
            for key, v in traj.items():
                m[f"traj_{key}_end"], m[f"traj_{key}_max"] = float(v[-1]), float(v.max())
            for key in ("scaled", "unscaled"):
                acc = _accs(run, f"ema_{key}")
                m[f"lag_ratio_{key}"] = float(_lags(run, f"ema_{key}").mean() / lag_ref)
                m[f"acc_ema_{key}_early"], m[f"acc_ema_{key}_end"] = acc[early], acc[-1]
                m[f"acc_gap_{key}_mean"] = float(np.abs(acc - acc_ref).mean())
            out[kind, k] = {key: float(v) for key, v in m.items()}
        for batch in s.batches:
            out[kind, batch, "acc"] = runs[kind, batch]["points"][-1]["acc"]["online"]
    return out


# ----------------------------------------------------------------------------- report


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def summarize(per_seed: list[dict], s: Settings) -> dict:
    """Mean and std over seeds of every metric of :func:`seed_metrics`."""
    summary: dict[str, Any] = {"ema": {}, "accuracy": {}}
    for kind in OPTIMIZERS:
        for k in s.kappas:
            keys = per_seed[0][kind, k]
            summary["ema"][f"{kind}/k{k}"] = {
                key: _mean_std([m[kind, k][key] for m in per_seed]) for key in keys
            }
        for batch in s.batches:
            summary["accuracy"][f"{kind}/B{batch}"] = _mean_std(
                [m[kind, batch, "acc"] for m in per_seed]
            )
    return summary


def _pm(stat: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _cells(m: dict, *keys: str, scale: float = 1.0, digits: int = 3) -> str:
    """'mean ± std / mean ± std / ...' of the metrics ``keys`` of ``m``: one table cell."""
    return " / ".join(_pm(m[key], scale, digits) for key in keys)


def _ema_rows(summary: dict, s: Settings):
    """(optimizer, kappa, its EMA metrics) for every row of the EMA tables."""
    for kind in OPTIMIZERS:
        for k in s.kappas:
            yield kind, k, summary["ema"][f"{kind}/k{k}"]


def markdown_tables(summary: dict, lrs: dict, exact: dict[int, float], s: Settings, n: int) -> str:
    """The three result tables (EMA in training, EMA on a fixed trajectory, LARS vs SGD)."""
    rho, b = s.ema_decay, s.base_batch
    total = s.total_samples(n)
    ema_acc = lambda when: [f"acc_ema_{v}_{when}" for v in ("ref", "scaled", "unscaled")]
    early = summary["ema"][f"sgd/k{s.kappas[0]}"]["early_samples"]["mean"]
    lines = [
        f"Digits, MLP {list(s.hidden)}, {total} samples ({total / n:.1f} epochs) per run, "
        f"reference batch B = {b}, learning rates tuned at B (SGD {lrs['sgd']['lr']:g}, "
        f"LARS {lrs['lars']['lr']:g}) and moved by the linear rule; warmup "
        f"{s.warmup_epochs:g} epochs + cosine, in samples; EMA decay rho = {rho} at B; "
        f"mean ± std over {s.seeds} seed(s). dist.: ||theta - theta_ref|| / ||theta_ref|| at "
        f"equal samples seen, 'early' after {early:.0f} samples ({early / n:.1f} epochs), "
        f"'end' after the last step.",
        "",
        "**1. EMA scaling rule in training.** Reference: the EMA of the batch-B run. 'online' "
        "is the distance between the trained parameters themselves, the floor for any EMA "
        "distance. lag ratio: mean over training of ||EMA - params|| / ||params|| in the κ·B "
        "run over the same in the B run (1 = the EMA trails its trajectory as at B).",
        "",
        "| optimizer | κ | batch | ρ per step: scaled / unscaled "
        "| dist. early: scaled / unscaled / online | dist. end: scaled / unscaled / online "
        "| lag ratio: scaled / unscaled "
        "| EMA test acc. early (%): B / scaled / unscaled "
        "| EMA test acc. end (%): B / scaled / unscaled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, k, m in _ema_rows(summary, s):
        lines.append(
            f"| {kind} | {k} | {k * b} | {rho**k:.4f} / {rho} "
            f"| {_cells(m, 'dist_scaled_early', 'dist_unscaled_early', 'dist_online_early')} "
            f"| {_cells(m, 'dist_scaled_end', 'dist_unscaled_end', 'dist_online_end')} "
            f"| {_cells(m, 'lag_ratio_scaled', 'lag_ratio_unscaled', digits=2)} "
            f"| {_cells(m, *ema_acc('early'), scale=100, digits=1)} "
            f"| {_cells(m, *ema_acc('end'), scale=100, digits=1)} |"
        )
    lines += [
        "",
        "**2. EMA scaling rule on a fixed trajectory** (the batch-B training trajectory; an EMA "
        "fed one snapshot in κ, against the every-step EMA at ρ; last column: κ steps at ρ vs "
        "one step at ρ^κ on a constant segment, max |difference|)",
        "",
        "| optimizer | κ | dist. one-in-κ at ρ^κ (end / max) | dist. one-in-κ at ρ (end / max) "
        "| constant segment |",
        "|---|---|---|---|---|",
    ]
    for kind, k, m in _ema_rows(summary, s):
        lines.append(
            f"| {kind} | {k} | {_cells(m, 'traj_scaled_end', 'traj_scaled_max', digits=4)} "
            f"| {_cells(m, 'traj_unscaled_end', 'traj_unscaled_max', digits=4)} "
            f"| {exact[k]:.1e} |"
        )
    ref = summary["accuracy"][f"sgd/B{b}"]
    lines += [
        "",
        f"**3. LARS at a large batch** (same epochs for every batch; Δ: test accuracy minus "
        f"SGD + momentum at B = {b}, in points)",
        "",
        "| optimizer | batch | κ | peak lr | steps | test acc. (%) | Δ vs SGD @ B |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in OPTIMIZERS:
        for batch in s.batches:
            acc = summary["accuracy"][f"{kind}/B{batch}"]
            lr = scaling.learning_rate(lrs[kind]["lr"], b, batch, "linear")
            delta = {"mean": acc["mean"] - ref["mean"], "std": acc["std"]}
            lines.append(
                f"| {kind} | {batch} | {batch // b} | {lr:g} | {total // batch} "
                f"| {_pm(acc, 100, 1)} | {delta['mean'] * 100:+.1f} |"
            )
    return "\n".join(lines)
