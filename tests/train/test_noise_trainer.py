"""The trainer's in-step gradient-noise statistics (``config.noise``, ``jaxbatch.train.noise``).

A two-layer regression MLP whose parameters and activations carry logical axis names goes through
the trainer's own pieces (``optimizer.make_optimizer``, ``step.make_train_step`` traced under the
mesh and rules as ``loop.build`` does, the state shardings of ``loop.state_shardings``) on the
meshes data×fsdp×tensor = 1×1×1, 8×1×1, 2×4×1, 4×1×2, with and without micro-batches. The logged
|G|², tr Σ and B_simple must equal an independent computation from the per-group gradients
(``jax.grad`` of each group's examples, one at a time, estimators in float64 NumPy), and hence
agree across meshes.
"""

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import optim, parallel
from jaxbatch.train import config as config_lib
from jaxbatch.train import loop
from jaxbatch.train import noise as noise_lib
from jaxbatch.train import optimizer as optimizer_lib
from jaxbatch.train import step as step_lib
from jaxbatch.train.task_base import Task

D, H, B = 8, 16, 64
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class MLP(nn.Module):
    """x [B, D] -> tanh(x a) b, kernels named ('embed', 'mlp') and ('mlp', 'embed')."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.5)
        a = self.param("a", nn.with_logical_partitioning(init, ("embed", "mlp")), (D, H))
        b = self.param("b", nn.with_logical_partitioning(init, ("mlp", "embed")), (H, D))
        x = nn.with_logical_constraint(x, ("batch", "embed"))
        h = nn.with_logical_constraint(jnp.tanh(x @ a), ("batch", "mlp"))
        return nn.with_logical_constraint(h @ b, ("batch", "embed"))


def _loss(model, params, batch):
    out = model.apply({"params": params}, batch["x"])
    return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))


def _task():
    model = MLP()

    def loss_fn(params, model_state, batch, rng):
        del rng
        return _loss(model, params, batch), ({}, model_state)

    return Task(
        "regression",
        model,
        ("x", "y"),
        lambda rng, batch: model.init(rng, batch["x"]),
        loss_fn,
        lambda variables, batch: {},
        lambda out: {},
        "loss",
    )


def _config(micro_batches=1, **noise_and_optimizer):
    cfg = config_lib.default_config()
    cfg.task = "classification"  # a per-example loss without batch norm, as the MLP here
    cfg.dataset.name = "synthetic"
    cfg.model.name = "mlp"
    cfg.batch_size = cfg.reference_batch_size = B
    cfg.micro_batches = micro_batches
    cfg.total_samples = B * 10
    cfg.optimizer.name = "sgd"
    cfg.optimizer.learning_rate = 0.1
    cfg.optimizer.momentum = 0.0
    cfg.schedule.name = "constant"
    cfg.noise.ema_samples = 4 * B
    for key, value in noise_and_optimizer.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def _batches(steps=2):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        x = rng.standard_normal((B, D)).astype(np.float32)
        y = (np.sin(x) + 0.3 * rng.standard_normal((B, D))).astype(np.float32)
        out.append({"x": x, "y": y})
    return out


def _build(cfg, mesh_shape, devices):
    """(train step, fresh state, mesh): ``loop.build``'s path for a task that is not registered."""
    task = _task()
    data, fsdp, tensor = mesh_shape
    mesh = parallel.make_mesh(
        data=data, fsdp=fsdp, tensor=tensor, devices=devices[: data * fsdp * tensor]
    )
    rules = parallel.DEFAULT_RULES
    init_batch = {k: v[:2] for k, v in _batches(1)[0].items()}
    rng = jax.random.PRNGKey(0)
    abstract_vars = jax.eval_shape(task.init_fn, rng, init_batch)
    params, model_state = step_lib.split_variables(nn.meta.unbox(abstract_vars))
    micro = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((B // cfg.micro_batches, *x.shape[1:]), x.dtype), init_batch
    )
    aux = step_lib.aux_shapes(task, params, model_state, micro)
    tx = optimizer_lib.make_optimizer(cfg, aux_shapes=aux)
    init = lambda r, b: step_lib.init_state(task, tx, None, r, b)
    abstract_state = jax.eval_shape(init, rng, init_batch)
    shardings = loop.state_shardings(None, mesh, abstract_vars, abstract_state, rules)
    step = jax.jit(
        loop.traced_under_mesh(
            step_lib.make_train_step(task, tx, None, micro_batches=cfg.micro_batches), mesh, rules
        ),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
    )
    state = jax.jit(loop.traced_under_mesh(init, mesh, rules), out_shardings=shardings)(
        rng, init_batch
    )
    return step, state, mesh


def _train(cfg, mesh_shape, devices, steps=2):
    step, state, mesh = _build(cfg, mesh_shape, devices)
    params, metrics = [], []
    for batch in _batches(steps):
        params.append(jax.device_get(state.params))
        state, m = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, params, metrics


def _reference(params_per_step, k, groups, ema_samples):
    """The logged statistics from the per-group gradients, computed one group at a time."""
    model = MLP()
    grad = jax.jit(jax.grad(lambda p, b: _loss(model, p, b)))
    decay = math.exp(-B / ema_samples)
    ema_g2 = ema_tr = 0.0
    out = []
    for t, (params, batch) in enumerate(
        zip(params_per_step, _batches(len(params_per_step)), strict=True)
    ):
        small = []
        for j in range(k):  # micro-batch j: rows j, j + k, ... (optim.accumulate's strided split)
            micro = {f: v[j::k] for f, v in batch.items()}
            n = B // k // groups
            for h in range(groups):  # group h: the h-th contiguous block of the micro-batch
                rows = {f: v[h * n : (h + 1) * n] for f, v in micro.items()}
                g = grad(params, rows)
                flat = [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)]
                small.append(np.concatenate(flat))
        small = np.stack(small)
        sq_small = np.mean(np.sum(small**2, axis=1))  # the mean of the squared norms
        sq_big = np.sum(small.mean(axis=0) ** 2)
        b_small, b_big = B / (k * groups), B
        g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
        trace = (sq_small - sq_big) / (1 / b_small - 1 / b_big)
        ema_g2 = decay * ema_g2 + (1 - decay) * g2
        ema_tr = decay * ema_tr + (1 - decay) * trace
        debias = 1 - decay ** (t + 1)
        out.append(
            dict(
                noise_g2_step=g2,
                noise_trace_step=trace,
                noise_g2=ema_g2 / debias,
                noise_trace=ema_tr / debias,
                b_simple=ema_tr / ema_g2,
                noise_b_small=b_small,
                noise_b_big=b_big,
            )
        )
    return out


MESHES = ((1, 1, 1), (8, 1, 1), (2, 4, 1), (4, 1, 2))
_RESULTS: dict = {}


@pytest.mark.parametrize("k", [1, 2], ids=["groups_only", "with_micro_batches"])
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_logged_noise_equals_the_per_group_computation(eight_devices, mesh, k):
    """noise.groups = 8 / k (8 small gradients per step) on every mesh: the logged estimates are
    those of the per-group gradients, step after step (EMA with decay exp(-B/ema_samples))."""
    cfg = _config(k, noise__groups=8 // k)
    _, params, metrics = _train(cfg, mesh, eight_devices)
    want = _reference(params, k, 8 // k, cfg.noise.ema_samples)
    for got_t, want_t in zip(metrics, want, strict=True):
        for key, value in want_t.items():
            np.testing.assert_allclose(got_t[key], value, rtol=2e-4, err_msg=key)
    assert metrics[0]["noise_trace_step"] > 0 and metrics[0]["b_simple"] > 0
    _RESULTS[mesh, k] = metrics


@pytest.mark.parametrize("k", [1, 2], ids=["groups_only", "with_micro_batches"])
def test_estimates_agree_across_meshes(eight_devices, k):
    for mesh in MESHES:
        if (mesh, k) not in _RESULTS:
            _RESULTS[mesh, k] = _train(_config(k, noise__groups=8 // k), mesh, eight_devices)[2]
    base = _RESULTS[MESHES[0], k]
    for mesh in MESHES[1:]:
        for got_t, want_t in zip(_RESULTS[mesh, k], base, strict=True):
            for key in ("noise_g2", "noise_trace", "b_simple", "loss"):
                np.testing.assert_allclose(got_t[key], want_t[key], rtol=1e-4, err_msg=(mesh, key))


@pytest.mark.parametrize(
    "mesh, groups", [((8, 1, 1), 8), ((2, 4, 1), 8), ((4, 1, 2), 4), ((1, 1, 1), 2)]
)
def test_automatic_groups_are_the_data_parallel_replicas(eight_devices, mesh, groups):
    """noise.groups = 0: G = data × fsdp (2 on one batch shard), visible as B_small = B / G."""
    _, params, metrics = _train(_config(1), mesh, eight_devices, steps=1)
    assert metrics[0]["noise_b_small"] == B / groups
    want = _reference(params, 1, groups, 4 * B)[0]
    np.testing.assert_allclose(metrics[0]["noise_trace_step"], want["noise_trace_step"], rtol=2e-4)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1)], ids=["8x1x1", "2x4x1"])
def test_groups_run_on_their_own_devices(eight_devices, mesh):
    """The per-device FLOPs of the compiled step grow by the norms only (measured +4 %), not by
    the number of groups: each device computes its own group's gradient (a group axis left
    replicated would cost up to 8x)."""
    flops = {}
    for on in (True, False):
        step, state, m = _build(_config(1, noise__enabled=on), mesh, eight_devices)
        batch = jax.device_put(_batches(1)[0], parallel.batch_sharding(m))
        flops[on] = step.lower(state, batch).compile().cost_analysis()["flops"]
    assert flops[True] < 1.25 * flops[False], flops


def test_disabled_logs_nothing_and_changes_no_update(eight_devices):
    on_state, _, on = _train(_config(1), (8, 1, 1), eight_devices, steps=1)
    off_state, _, off = _train(_config(1, noise__enabled=False), (8, 1, 1), eight_devices, steps=1)
    assert "b_simple" in on[0] and "b_simple" not in off[0] and "noise_g2" not in off[0]
    for a, b in zip(
        jax.tree.leaves(on_state.params), jax.tree.leaves(off_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "scaling, state_type", [("vrgd", optim.VRGDState), ("agvm", optim.AGVMState)]
)
def test_gradient_scaling_wrappers_are_applied(eight_devices, scaling, state_type):
    """optimizer.gradient_scaling puts the wrapper into the state; two steps on 8 devices (the
    small gradients are the 8 per-replica groups) change every parameter and stay finite."""
    cfg = _config(
        1,
        optimizer__gradient_scaling=scaling,
        optimizer__agvm_interval=1,
        optimizer__agvm_start_samples=0,
    )
    config_lib.validate(cfg)
    state, params, metrics = _train(cfg, (8, 1, 1), eight_devices, steps=2)
    inner = state.opt_state.inner_state
    assert isinstance(inner, state_type), type(inner)
    for before, after in zip(
        jax.tree.leaves(params[0]), jax.tree.leaves(state.params), strict=True
    ):
        after = np.asarray(after)
        assert np.all(np.isfinite(after)) and not np.allclose(after, before)
    assert np.isfinite(metrics[-1]["b_simple"])
    if scaling == "vrgd":  # the multipliers moved something off 1: some elements were clipped
        clipped = [float(x) for x in jax.tree.leaves(inner.clipped_fraction)]
        assert max(clipped) > 0
    else:  # default groups: one per top-level module ('a', 'b'); 'a' is the reference
        mu = np.asarray(inner.mu)
        assert mu.shape == (2,) and mu[0] == 1.0 and mu[1] != 1.0


def test_vrgd_equals_the_per_group_gsnr(eight_devices):
    """The first VRGD step on 8 devices: the update is -lr × gsnr_multipliers(mean, mean of
    squares of the 8 per-replica gradients) × mean, computed here group by group."""
    cfg = _config(1, optimizer__gradient_scaling="vrgd")
    state, params, _ = _train(cfg, (8, 1, 1), eight_devices, steps=1)
    model, batch = MLP(), _batches(1)[0]
    grad = jax.jit(jax.grad(lambda p, b: _loss(model, p, b)))
    groups = [
        grad(params[0], {f: v[h * 8 : (h + 1) * 8] for f, v in batch.items()}) for h in range(8)
    ]
    mean = jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *groups)
    sq = jax.tree.map(lambda *g: np.mean(np.stack(g) ** 2, 0), *groups)
    mult, _ = optim.gsnr_multipliers(mean, sq, min_ratio=0.9, max_ratio=1.1)
    for key in ("a", "b"):
        want = params[0][key] - 0.1 * np.asarray(mult[key]) * mean[key]
        np.testing.assert_allclose(np.asarray(state.params[key]), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "config, match",
    [
        ("digits_resnet_lars.py:runlocal", "batch norm"),
        ("codesearch_clip.py:runlocal", "contrastive loss couples"),
    ],
)
def test_explicit_groups_are_refused_where_they_do_not_apply(config, match):
    cfg = config_lib.load_config(str(CONFIGS / config), ["noise.groups=2"])
    with pytest.raises(config_lib.ConfigError, match=rf"config.noise.groups=2 .*{match}"):
        loop.build(cfg, train_data=_zeros_like_data(cfg), devices=jax.devices()[:1])


def test_automatic_groups_are_switched_off_with_a_line_for_batch_norm(capsys):
    path = str(CONFIGS / "digits_resnet_lars.py:runlocal")
    cfg = config_lib.load_config(path, ["micro_batches=1"])
    run = loop.build(cfg, train_data=_zeros_like_data(cfg), devices=jax.devices()[:1])
    assert "per-replica groups off (the model has batch norm" in capsys.readouterr().out
    assert not run.tx.noise.groups_allowed
    assert noise_lib.plan_groups(run.tx.noise, {"data": 8}, 64, 1).groups == 1


def _zeros_like_data(cfg):
    from jaxbatch.train import shapes

    return shapes.zero_examples(shapes.example_shapes(cfg))
