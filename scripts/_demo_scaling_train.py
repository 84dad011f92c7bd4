"""scripts/demo_scaling.py, part 1: its settings, data, model, EMA building block and training run.

Run the demo through ``scripts/demo_scaling.py``; this module holds what one training run needs
(see that file's docstring for the experiments and their references).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbatch import _validate, optim, scaling
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
        _validate.decay("ema_decay", self.ema_decay)
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

#: The optimizers every experiment compares (see :func:`make_optimizer`).
OPTIMIZERS = ("sgd", "lars")


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
