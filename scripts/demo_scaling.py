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
``bench_results/demo_scaling.json``).

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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbatch import optim, scaling
from jaxbatch.data import load_arrays

# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines one demo run (:data:`QUICK` is the small variant for tests).

    The learning rates are picked from ``*_lr_grid`` at ``base_batch`` (a one-value grid is
    used as is); every other hyper-parameter is fixed here and moved by the rules only.
    """

    base_batch: int = 32
    kappas: tuple[int, ...] = (4, 8, 16, 32)
    epochs: int = 40
    warmup_epochs: float = 4.0
    early_epochs: float = 2.0
    ema_decay: float = 0.99
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Biases are outside LARS' trust ratio (exclude_bias_and_norm), so the global learning rate
    # is also their plain SGD rate; trust_coefficient = 0.02 puts it in SGD's range.
    trust_coefficient: float = 0.02
    hidden: tuple[int, ...] = (128, 128)
    sgd_lr_grid: tuple[float, ...] = (0.02, 0.05, 0.1)
    lars_lr_grid: tuple[float, ...] = (0.025, 0.05, 0.1)
    validation_size: int = 287
    seeds: int = 3

    def __post_init__(self):
        if self.base_batch < 1 or not self.kappas or any(k < 2 for k in self.kappas):
            raise ValueError(
                f"need base_batch >= 1 and at least one kappa, all >= 2; got "
                f"base_batch={self.base_batch!r}, kappas={self.kappas!r}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.seeds < 1 or self.epochs < 1:
            raise ValueError(f"need seeds >= 1 and epochs >= 1, got {self.seeds}, {self.epochs}")
        if not self.sgd_lr_grid or not self.lars_lr_grid:
            raise ValueError("the learning-rate grids must not be empty")

    @property
    def batches(self) -> tuple[int, ...]:
        """The reference batch followed by kappa·B for every kappa."""
        return (self.base_batch, *(self.base_batch * k for k in self.kappas))

    @property
    def eval_every(self) -> int:
        """Samples between evaluations: the largest batch, so every run stops at each point."""
        return max(self.batches)

    def total_samples(self, num_examples: int) -> int:
        """``epochs`` epochs rounded down to a whole number of evaluation intervals."""
        total = (self.epochs * num_examples) // self.eval_every * self.eval_every
        if total == 0:
            raise ValueError(
                f"{self.epochs} epochs of {num_examples} examples are fewer than one batch of "
                f"{self.eval_every}"
            )
        return total


#: ~30 s on 2 CPU cores: one kappa, a smaller MLP, fewer epochs, no tuning, one seed.
QUICK = Settings(
    kappas=(8,),
    epochs=8,
    warmup_epochs=1.0,
    hidden=(64, 64),
    sgd_lr_grid=(0.05,),
    lars_lr_grid=(0.1,),
    seeds=1,
)

KINDS = ("sgd", "lars")


# ----------------------------------------------------------------------------- data and model


def load_digits() -> dict[str, np.ndarray]:
    """The digits splits flattened to 64 features: {'x_train', 'y_train', 'x_test', 'y_test'}."""
    out = {}
    for split in ("train", "test"):
        arrays = load_arrays("digits", split)
        out[f"x_{split}"] = arrays["image"].reshape(arrays["image"].shape[0], -1)
        out[f"y_{split}"] = arrays["label"]
    return out


def sample_stream(num_examples: int, num_samples: int, seed: int) -> np.ndarray:
    """Indices of the first ``num_samples`` samples of a stream of per-epoch permutations.

    Args:
      num_examples: size of the training set (> 0).
      num_samples: length of the stream (>= 0).
      seed: NumPy seed.

    Returns:
      int64 [num_samples]; every block of ``num_examples`` consecutive entries starting at a
      multiple of ``num_examples`` is a permutation of ``range(num_examples)``.
    """
    if num_examples <= 0 or num_samples < 0:
        raise ValueError(
            f"need num_examples > 0 and num_samples >= 0, got {num_examples}, {num_samples}"
        )
    rng = np.random.default_rng(seed)
    epochs = -(-num_samples // num_examples)
    perms = [rng.permutation(num_examples) for _ in range(epochs)]
    return np.concatenate(perms or [np.zeros(0, np.int64)])[:num_samples]


class Mlp(nn.Module):
    """ReLU MLP classifier on flattened 8x8 digits."""

    hidden: Sequence[int]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def accuracy(model: nn.Module, params: Any, x: Any, y: Any) -> jax.Array:
    """Fraction of ``x`` classified as ``y`` (a traceable f32 scalar)."""
    logits = model.apply({"params": params}, x)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def flat(tree: Any) -> np.ndarray:
    """All leaves of ``tree`` as one float64 vector."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def relative_distance(tree: Any, reference: Any) -> float:
    """||tree - reference|| / ||reference|| over all leaves (L2 of the flattened vectors)."""
    a, b = flat(tree), flat(reference)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- EMA building block


def maybe_ema_update(
    transform: optax.GradientTransformation, every: int, state: Any, tree: Any, step: jax.Array
) -> Any:
    """One ``model_ema`` update when ``(step + 1) % every == 0``, else the state unchanged.

    ``every = kappa`` feeds the EMA one snapshot out of every kappa: what a run at kappa·B sees
    of the batch-B trajectory (the params after each block of kappa small steps).
    """
    _, new_state = transform.update(tree, state)
    if every == 1:
        return new_state
    take = (step + 1) % every == 0
    return jax.tree.map(lambda n, o: jnp.where(take, n, o), new_state, state)


def ema_of_trajectory(
    snapshots: Any, transform: optax.GradientTransformation, *, every: int, init: Any
) -> Any:
    """EMA of a stacked trajectory, updated once every ``every`` snapshots.

    Args:
      snapshots: pytree whose leaves have a leading time axis [T, ...].
      transform: a :func:`jaxbatch.optim.model_ema` transform.
      every: update on snapshots every-1, 2·every-1, ... (>= 1).
      init: the tree the EMA starts from.

    Returns:
      The EMA after the last snapshot.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every!r}")

    def body(carry, snapshot):
        state, step = carry
        return (maybe_ema_update(transform, every, state, snapshot, step), step + 1), None

    (state, _), _ = jax.lax.scan(body, (transform.init(init), jnp.int32(0)), snapshots)
    return state.ema


# ----------------------------------------------------------------------------- training


def make_optimizer(
    kind: str, schedule: optax.Schedule, s: Settings
) -> optax.GradientTransformation:
    """'sgd': SGD + momentum, L2 decay added to the gradient; 'lars': :func:`jaxbatch.optim.lars`.

    Both use ``s.momentum`` and ``s.weight_decay`` and exempt biases from the decay
    (``exclude_bias_and_norm``); LARS also exempts them from the trust ratio.
    """
    mask = optim.masks.exclude_bias_and_norm
    if kind == "sgd":
        return optax.chain(
            optax.add_decayed_weights(s.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=s.momentum),
        )
    if kind == "lars":
        return optim.lars(
            schedule,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            trust_coefficient=s.trust_coefficient,
            weight_decay_mask=mask,
            trust_ratio_mask=mask,
        )
    raise ValueError(f"optimizer kind must be 'sgd' or 'lars', got {kind!r}")


def train(
    *,
    kind: str,
    base_lr: float,
    batch: int,
    emas: dict[str, tuple[optax.GradientTransformation, int]],
    data: dict[str, np.ndarray],
    stream: np.ndarray,
    eval_every: int,
    s: Settings,
    init_seed: int,
) -> dict[str, Any]:
    """Trains the MLP at ``batch`` on ``stream`` and evaluates every ``eval_every`` samples.

    The learning rate is ``base_lr`` (tuned at ``s.base_batch``) moved by the linear rule
    (lr = base_lr·batch / base_batch), on a warmup + cosine schedule in samples, so every batch
    size follows the same schedule in epochs.

    Args:
      kind: 'sgd' or 'lars' (see :func:`make_optimizer`).
      base_lr: learning rate at ``s.base_batch``.
      batch: the batch size of this run.
      emas: name -> (``model_ema`` transform, update every this many steps).
      data: :func:`load_digits` arrays; accuracies are measured on 'x_test' / 'y_test'.
      stream: sample indices (:func:`sample_stream`); its length is the sample budget.
      eval_every: samples between evaluations (a multiple of ``batch``).
      s: the settings.
      init_seed: seed of the parameter init (the same for every batch size).

    Returns:
      {'kind', 'batch', 'lr', 'points'}: one point per evaluation with 'samples', the last
      training 'loss', 'vectors' (name -> flattened float64 params: 'online' and every EMA)
      and 'acc' (name -> test accuracy).
    """
    if eval_every % batch or len(stream) % eval_every:
        raise ValueError(
            f"eval_every={eval_every} must be a multiple of batch={batch} and divide the "
            f"stream length {len(stream)}"
        )
    n_train = len(data["y_train"])
    lr = scaling.learning_rate(base_lr, s.base_batch, batch, "linear")
    schedule = scaling.warmup_cosine_in_samples(
        lr,
        warmup_samples=s.warmup_epochs * n_train,
        total_samples=len(stream),
        batch_size=batch,
    )
    tx = make_optimizer(kind, schedule, s)
    model = Mlp(s.hidden)
    params = model.init(jax.random.key(init_seed), data["x_train"][:1])["params"]
    ema_states = {name: t.init(params) for name, (t, _) in emas.items()}

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, xy):
        p, opt_state, ema_st, t = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, *xy)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        ema_st = {
            name: maybe_ema_update(tr, every, ema_st[name], p, t)
            for name, (tr, every) in emas.items()
        }
        return (p, opt_state, ema_st, t + 1), loss

    @jax.jit
    def segment(carry, x, y):
        return jax.lax.scan(step, carry, (x, y))

    @jax.jit
    def evaluate(trees):
        x, y = data["x_test"], data["y_test"]
        return {name: accuracy(model, tree, x, y) for name, tree in trees.items()}

    carry = (params, tx.init(params), ema_states, jnp.int32(0))
    steps = eval_every // batch
    points = []
    for start in range(0, len(stream), eval_every):
        idx = stream[start : start + eval_every].reshape(steps, batch)
        carry, losses = segment(carry, data["x_train"][idx], data["y_train"][idx])
        p, _, ema_st, _ = carry
        trees = {"online": p, **{name: st.ema for name, st in ema_st.items()}}
        points.append(
            {
                "samples": start + eval_every,
                "loss": float(losses[-1]),
                "vectors": {name: flat(tree) for name, tree in trees.items()},
                "acc": {name: float(a) for name, a in evaluate(trees).items()},
            }
        )
    return {"kind": kind, "batch": batch, "lr": lr, "points": points}


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
    for kind in KINDS:
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


def _distances(run: dict, ref: dict, name: str, ref_name: str) -> np.ndarray:
    """Relative distance of ``run``'s tree ``name`` to ``ref``'s ``ref_name`` at every point."""
    return np.array(
        [
            relative_distance_vectors(p["vectors"][name], q["vectors"][ref_name])
            for p, q in zip(run["points"], ref["points"], strict=True)
        ]
    )


def relative_distance_vectors(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| for flat vectors."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _lags(run: dict, name: str) -> np.ndarray:
    """||ema - online|| / ||online|| of ``run`` at every point: how far the EMA trails."""
    return np.array(
        [
            relative_distance_vectors(p["vectors"][name], p["vectors"]["online"])
            for p in run["points"]
        ]
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
    for kind in KINDS:
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


# ----------------------------------------------------------------------------- report


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def summarize(per_seed: list[dict], s: Settings) -> dict:
    """Mean and std over seeds of every metric of :func:`seed_metrics`."""
    summary: dict[str, Any] = {"ema": {}, "accuracy": {}}
    for kind in KINDS:
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


def markdown_tables(summary: dict, lrs: dict, exact: dict[int, float], s: Settings, n: int) -> str:
    """The three result tables (EMA in training, EMA on a fixed trajectory, LARS vs SGD)."""
    rho, b = s.ema_decay, s.base_batch
    total = s.total_samples(n)
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
    for kind in KINDS:
        for k in s.kappas:
            m = summary["ema"][f"{kind}/k{k}"]
            d = lambda key, m=m: _pm(m[key], digits=3)
            a = lambda key, m=m: _pm(m[key], 100, 1)
            lines.append(
                f"| {kind} | {k} | {k * b} | {rho**k:.4f} / {rho} "
                f"| {d('dist_scaled_early')} / {d('dist_unscaled_early')} / "
                f"{d('dist_online_early')} "
                f"| {d('dist_scaled_end')} / {d('dist_unscaled_end')} / {d('dist_online_end')} "
                f"| {_pm(m['lag_ratio_scaled'], digits=2)} / "
                f"{_pm(m['lag_ratio_unscaled'], digits=2)} "
                f"| {a('acc_ema_ref_early')} / {a('acc_ema_scaled_early')} / "
                f"{a('acc_ema_unscaled_early')} "
                f"| {a('acc_ema_ref_end')} / {a('acc_ema_scaled_end')} / "
                f"{a('acc_ema_unscaled_end')} |"
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
    for kind in KINDS:
        for k in s.kappas:
            m = summary["ema"][f"{kind}/k{k}"]
            lines.append(
                f"| {kind} | {k} | {_pm(m['traj_scaled_end'], digits=4)} / "
                f"{_pm(m['traj_scaled_max'], digits=4)} "
                f"| {_pm(m['traj_unscaled_end'], digits=4)} / "
                f"{_pm(m['traj_unscaled_max'], digits=4)} | {exact[k]:.1e} |"
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
    for kind in KINDS:
        for batch in s.batches:
            acc = summary["accuracy"][f"{kind}/B{batch}"]
            lr = scaling.learning_rate(lrs[kind]["lr"], b, batch, "linear")
            delta = {"mean": acc["mean"] - ref["mean"], "std": acc["std"]}
            lines.append(
                f"| {kind} | {batch} | {batch // b} | {lr:g} | {total // batch} "
                f"| {_pm(acc, 100, 1)} | {delta['mean'] * 100:+.1f} |"
            )
    return "\n".join(lines)


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
