"""The batch-size scaling rules on real data: the EMA scaling rule and LARS at a large batch.

Two claims of issue 3, checked on the bundled digits data (1,437 train / 360 test 8x8 images)
with a small MLP (64 -> 128 -> 128 -> 10):

1. **EMA scaling rule** (Busbridge et al. 2023). The same model (same init, same data order) is
   trained with SGD + momentum and with LARS at the reference batch B and at kappa·B, the
   learning rate moved by the linear rule. Each run keeps two model EMAs of the parameters: one
   with the scaled per-step decay rho^kappa, one with the unscaled rho. At equal samples seen,
   the table reports the relative L2 distance of each EMA to the batch-B EMA, how far each EMA
   trails its own trajectory compared with the batch-B EMA (lag ratio), and the test accuracy
   of the EMA models. A second check needs no second training run: on the batch-B trajectory
   itself, an EMA updated once every kappa snapshots with rho^kappa (or rho) is compared with
   the every-step EMA at rho.
2. **LARS at a large batch** (You, Gitman, Ginsburg 2017). SGD + momentum at B against LARS at
   large batches (up to 1,024, most of the training set per step), all with the linear rule and
   a warmup + cosine schedule measured in samples, for the same number of epochs; plain SGD with
   the linear rule at the same large batches is the contrast.

Hyper-parameters are tuned at the reference batch only (learning rate on a grid, scored on a
validation split held out of the training set) and then moved to every other batch by the rules
of :mod:`jaxbatch.scaling`; nothing is tuned per large batch.

Data order: all runs of one seed read one stream, the concatenation of independent permutations
of the training set (one per epoch), and step t at batch b takes positions [t·b, (t+1)·b). So
one step at kappa·B sees exactly the samples of kappa consecutive steps at B, which is the
setting of the scaling rules' derivations (``jaxbatch.data.make_train_iterator`` drops each
epoch's remainder, so its batches at B and at kappa·B would not nest).

Run: ``python scripts/demo_scaling.py [--quick] [--seeds 3] [--out FILE]`` (default
``bench_results/demo_scaling.json``). This file holds the experiments; the training run is in
``scripts/_demo_scaling_train.py``, the metrics and tables in ``scripts/_demo_scaling_report.py``.

References:
  Busbridge et al., 2023, "How to Scale Your EMA", the EMA Scaling Rule (rho_hat = rho^kappa).
  Goyal et al., 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", Sec. 2.1-2.2.
  You, Gitman, Ginsburg, 2017, "Large Batch Training of Convolutional Networks", Algorithm 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The demo's parts live beside this file (scripts/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _demo_scaling_report import markdown_tables, seed_metrics, summarize  # noqa: E402
from _demo_scaling_train import (  # noqa: E402
    OPTIMIZERS,
    QUICK,
    Mlp,
    Settings,
    ema_of_trajectory,
    flat,
    load_digits,
    sample_stream,
    train,
)

from jaxbatch import optim  # noqa: E402

# ----------------------------------------------------------------------------- experiments


def ema_transforms(s: Settings, batch: int) -> dict[str, tuple[optax.GradientTransformation, int]]:
    """The EMAs each run keeps (name -> (transform, update every this many steps)).

    At kappa·B: 'ema_scaled' (rho^kappa per step, the EMA scaling rule) and 'ema_unscaled'
    (rho per step). At B: 'ema_ref' (rho), and for every kappa the trajectory check: an EMA fed
    one snapshot out of every kappa with rho^kappa ('traj_scaled_k{kappa}') or rho
    ('traj_unscaled_k{kappa}').
    """
    rho, b = s.ema_decay, s.base_batch
    if batch != b:
        return {
            "ema_scaled": (optim.model_ema(rho, batch_size=batch, reference_batch_size=b), 1),
            "ema_unscaled": (optim.model_ema(rho, batch_size=batch), 1),
        }
    emas = {"ema_ref": (optim.model_ema(rho, batch_size=b), 1)}
    for k in s.kappas:
        scaled = optim.model_ema(rho, batch_size=k * b, reference_batch_size=b)
        emas[f"traj_scaled_k{k}"] = (scaled, k)
        emas[f"traj_unscaled_k{k}"] = (optim.model_ema(rho, batch_size=k * b), k)
    return emas


def tune_learning_rates(s: Settings, data: dict[str, np.ndarray], log: Callable) -> dict:
    """Picks each optimizer's learning rate at ``s.base_batch`` on a held-out validation split.

    The last ``s.validation_size`` examples of a fixed permutation of the training set are the
    validation set; each grid value trains once on the rest (seed 0) and is scored by final
    validation accuracy (ties: the smaller rate). A one-value grid is returned untrained.

    Returns:
      {kind: {'lr': chosen, 'grid': {lr: validation accuracy}}}.
    """
    perm = np.random.default_rng(12345).permutation(len(data["y_train"]))
    fit, val = perm[: -s.validation_size], perm[-s.validation_size :]
    split = {
        "x_train": data["x_train"][fit],
        "y_train": data["y_train"][fit],
        "x_test": data["x_train"][val],
        "y_test": data["y_train"][val],
    }
    total = (s.epochs * len(fit)) // s.base_batch * s.base_batch
    stream = sample_stream(len(fit), total, seed=0)
    out = {}
    for kind, grid in (("sgd", s.sgd_lr_grid), ("lars", s.lars_lr_grid)):
        if len(grid) == 1:
            out[kind] = {"lr": grid[0], "grid": {}}
            continue
        scores = {}
        for lr in grid:
            run = train(
                kind=kind,
                base_lr=lr,
                batch=s.base_batch,
                emas={},
                data=split,
                stream=stream,
                eval_every=total,
                s=s,
                init_seed=0,
            )
            scores[lr] = run["points"][-1]["acc"]["online"]
            log(f"  tune {kind} lr={lr:g} @B={s.base_batch}: val acc {scores[lr]:.4f}")
        best = max(sorted(grid), key=lambda lr: scores[lr])  # max keeps the first (smallest) tie
        out[kind] = {"lr": best, "grid": scores}
    return out


def run_seed(seed: int, lrs: dict, s: Settings, data: dict[str, np.ndarray], log: Callable) -> dict:
    """Every (optimizer, batch) run of one seed: same init and same sample stream for all."""
    n = len(data["y_train"])
    stream = sample_stream(n, s.total_samples(n), seed=seed)
    runs = {}
    for kind in OPTIMIZERS:
        for batch in s.batches:
            t0 = time.perf_counter()
            runs[kind, batch] = train(
                kind=kind,
                base_lr=lrs[kind]["lr"],
                batch=batch,
                emas=ema_transforms(s, batch),
                data=data,
                stream=stream,
                eval_every=s.eval_every,
                s=s,
                init_seed=seed,
            )
            last = runs[kind, batch]["points"][-1]
            log(
                f"  seed {seed} {kind:4s} B={batch:5d}: test acc {last['acc']['online']:.4f}, "
                f"loss {last['loss']:.4f} ({time.perf_counter() - t0:.1f} s)"
            )
    return runs


def constant_segment_check(s: Settings, data: dict[str, np.ndarray]) -> dict[int, float]:
    """Max |difference| between kappa EMA steps at rho and one at rho^kappa on a fixed value.

    Starts both EMAs at a freshly initialised MLP and feeds kappa copies of a second one (a
    constant segment of a trajectory); on such a segment the rule is exact:
    rho^kappa·e + (1 - rho^kappa)·x either way. Returns {kappa: max abs difference}.
    """
    model = Mlp(s.hidden)
    start = model.init(jax.random.key(0), data["x_train"][:1])["params"]
    value = model.init(jax.random.key(1), data["x_train"][:1])["params"]
    out = {}
    for k in s.kappas:
        snapshots = jax.tree.map(lambda x, k=k: jnp.broadcast_to(x, (k, *x.shape)), value)
        every_step = ema_of_trajectory(
            snapshots, optim.model_ema(s.ema_decay, batch_size=s.base_batch), every=1, init=start
        )
        scaled = optim.model_ema(
            s.ema_decay, batch_size=k * s.base_batch, reference_batch_size=s.base_batch
        )
        once = ema_of_trajectory(snapshots, scaled, every=k, init=start)
        out[k] = float(np.abs(flat(every_step) - flat(once)).max())
    return out


# ----------------------------------------------------------------------------- entry point


def run_demo(s: Settings, *, log: Callable = print) -> dict:
    """Tunes at B, runs every seed, and returns {'settings', 'lrs', 'summary', 'per_seed', ...}."""
    data = load_digits()
    n = len(data["y_train"])
    t0 = time.perf_counter()
    lrs = tune_learning_rates(s, data, log)
    log(f"learning rates at B={s.base_batch}: sgd {lrs['sgd']['lr']:g}, lars {lrs['lars']['lr']:g}")
    per_seed = [seed_metrics(run_seed(seed, lrs, s, data, log), s, n) for seed in range(s.seeds)]
    summary = summarize(per_seed, s)
    exact = constant_segment_check(s, data)
    table = markdown_tables(summary, lrs, exact, s, n)
    return {
        "settings": dataclasses.asdict(s),
        "learning_rates": {
            kind: {"lr": v["lr"], "grid": {str(k): a for k, a in v["grid"].items()}}
            for kind, v in lrs.items()
        },
        "summary": summary,
        "constant_segment_max_abs_diff": {str(k): v for k, v in exact.items()},
        "per_seed": [
            {"/".join(map(str, key)): value for key, value in m.items()} for m in per_seed
        ],
        "table": table,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="the ~30 s variant (QUICK)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument("--sgd-lr-grid", default=None, help="comma-separated rates at B")
    parser.add_argument("--lars-lr-grid", default=None, help="comma-separated rates at B")
    parser.add_argument("--out", default="bench_results/demo_scaling.json", help="JSON path")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.seeds is not None:
        s = dataclasses.replace(s, seeds=args.seeds)
    for name in ("sgd_lr_grid", "lars_lr_grid"):
        if getattr(args, name) is not None:
            grid = tuple(float(v) for v in getattr(args, name).split(","))
            s = dataclasses.replace(s, **{name: grid})
    result = run_demo(s)
    print(result["table"])
    print(f"\n({result['seconds']:.0f} s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
