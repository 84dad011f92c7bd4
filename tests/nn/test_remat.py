"""Remat policies by name: same gradients as no remat, and the policy really is applied."""

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import nn as jnn
from jaxbatch.nn import POLICY_NAMES, DecoderLM, get_policy, remat

SMALL = dict(vocab_size=32, width=8, depth=2, heads=2, mlp_dim=16, max_len=8)


def _remat_policies(jaxpr):
    """The policies of all remat equations in a (closed) jaxpr, searched recursively."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_remat_policies(inner))
    return found


def _loss_and_grad(model, params, tokens):
    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return jax.value_and_grad(loss), loss


@pytest.fixture(scope="module")
def setup(fast_jit):
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, SMALL["vocab_size"])
    params = fast_jit(DecoderLM(**SMALL).init)(jax.random.key(1), tokens[:, :-1])["params"]
    return tokens, nn.meta.unbox(params)


# Policies whose gradients are compiled and compared (every policy's wiring is checked on its
# jaxpr): a policy only changes what the backward pass recomputes, and jax.checkpoint keeps the
# math; these cover full remat, a dtype-based, a name-based and an offload policy.
NUMERIC_POLICIES = ("none", "full", "dots", "save_qkv_proj", remat.OFFLOAD_POLICY_NAMES[0])


def _unstack(params):
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(SMALL["depth"]):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params


# The policies inside nn.scan; the unrolled path (prevent_cse=True) with two of them.
@pytest.mark.parametrize(
    "scan_layers,policies",
    [
        # Every save policy; two offload policies (on CPU they run as their save policies).
        (True, tuple(p for p in POLICY_NAMES if p not in remat.OFFLOAD_POLICY_NAMES[2:])),
        (False, ("full", "save_qkv_proj")),
    ],
    ids=["scan", "unrolled"],
)
def test_every_policy_gives_the_gradients_of_no_remat(setup, scan_layers, policies, fast_jit):
    tokens, params = setup
    if not scan_layers:
        params = _unstack(params)
    reference = None
    for name in ("none",) + tuple(p for p in policies if p != "none"):
        model = DecoderLM(**SMALL, scan_layers=scan_layers, remat_policy=name)
        value_and_grad, loss = _loss_and_grad(model, params, tokens)
        policies = _remat_policies(jax.make_jaxpr(loss)(params).jaxpr)
        if name == "none":
            assert policies == []
        else:  # one remat per layer (scan: one inside the scanned body)
            assert policies and all(p is get_policy(name) for p in policies), name
        if name not in NUMERIC_POLICIES:
            continue  # wired (the jaxpr check above); the gradients are checked on a subset
        value, grads = fast_jit(value_and_grad)(params)
        if reference is None:
            reference = (value, grads)
            continue
        np.testing.assert_allclose(value, reference[0], rtol=1e-6)
        for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1]), strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7, err_msg=name)


def _saved_residuals(policy, setup, capsys):
    """The residuals one remat'ed layer keeps for the backward pass, one line each."""
    tokens, params = setup
    model = DecoderLM(**SMALL, scan_layers=False, remat_policy=policy)
    _, loss = _loss_and_grad(model, _unstack(params), tokens)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, _unstack(params))
    return capsys.readouterr().out.splitlines()


def test_named_policies_save_the_tagged_activations_of_the_model(setup, capsys):
    qkv = "\n".join(_saved_residuals("save_qkv_proj", setup, capsys))
    assert all(f"named '{n}_proj'" in qkv for n in ("query", "key", "value"))
    assert "named 'out_proj'" not in qkv
    out = "\n".join(_saved_residuals("save_out_proj", setup, capsys))
    assert "named 'out_proj'" in out and "named 'query_proj'" not in out
    # Full remat keeps fewer residuals than no remat at all.
    assert len(_saved_residuals("full", setup, capsys)) < len(
        _saved_residuals("none", setup, capsys)
    )


def test_unknown_policy_raises_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown remat policy 'everything'.*'dots'"):
        get_policy("everything")


def _lowered_text(policy, setup, platform):
    tokens, params = setup
    model = DecoderLM(**SMALL, remat_policy=policy)
    value_and_grad, _ = _loss_and_grad(model, params, tokens)
    traced = jax.jit(value_and_grad).trace(params)
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_offload_policies_lower_with_host_placements(setup, platform):
    to_host = '_xla_buffer_placement = "pinned_host"'
    to_device = '_xla_buffer_placement = "device"'
    for policy in ("offload_qkv_proj", "offload_dots_with_no_batch_dims"):
        text = _lowered_text(policy, setup, platform)
        # The forward moves each offloaded residual to pinned host memory, the backward back.
        assert text.count(to_host) >= 1 and text.count(to_device) >= 1, policy
        if policy == "offload_qkv_proj":  # q, k and v: three residuals each way
            assert text.count(to_host) == 3 and text.count(to_device) == 3, policy
    assert to_host not in _lowered_text("save_qkv_proj", setup, platform)


def test_offload_policies_compile_and_run_on_cpu_without_placements(setup):
    # On the CPU backend host and device memory are one: no annotation, same program as saving.
    text = _lowered_text("offload_qkv_proj", setup, "cpu")
    assert "pinned_host" not in text
    assert set(remat.OFFLOAD_POLICY_NAMES) <= set(POLICY_NAMES)


def test_check_policies_per_group():
    assert remat.check_policies("full", where="M") == ("full",)
    assert remat.check_policies(("full", "none"), where="M", count=2) == ("full", "none")
    with pytest.raises(ValueError, match=r"M: remat_policy .* names 3 policies; expected one"):
        remat.check_policies(("full", "none", "dots"), where="M", count=2)
    with pytest.raises(ValueError, match=r"M: unknown remat policy 'ful'"):
        remat.check_policies(("full", "ful"), where="M", count=2)


# XLA:CPU drops optimization barriers before fusion and scheduling, and with them the remat of
# unrolled layers (the recomputation is merged back into the forward pass: the same temporary
# bytes with and without remat). TPU and GPU keep the barriers; compiling with the CPU pass that
# removes them disabled gives the program the accelerators would schedule.
_KEEP_BARRIERS = {
    "xla_disable_hlo_passes": "cse_barrier_expander",
    "xla_backend_optimization_level": 0,
}


def _vit(policy):
    model = jnn.ViT(
        patch_size=4, hidden=16, depth=3, heads=2, mlp_dim=64, num_classes=3, remat_policy=policy
    )
    return model, jax.random.normal(jax.random.key(0), (4, 16, 16, 3))


def _text(policy):
    model = jnn.TextEncoder(width=16, depth=3, heads=2, mlp_dim=64, max_len=32, remat_policy=policy)
    tokens = jax.random.randint(jax.random.key(0), (4, 32), 1, 258)
    return model, tokens.at[0, -5:].set(0)


def _resnet(policy):
    model = jnn.resnet_cifar(stage_sizes=(2, 1), num_filters=8, num_classes=3, remat_policy=policy)
    return model, jax.random.normal(jax.random.key(0), (4, 16, 16, 3))


@pytest.mark.parametrize("build", [_vit, _text, _resnet], ids=["vit", "text_encoder", "resnet"])
def test_model_remat_policy_cuts_compiled_memory_and_keeps_gradients(build, fast_jit):
    model, x = build("none")
    variables = fast_jit(lambda k: model.init(k, x, train=False))(jax.random.key(1))
    variables = nn.meta.unbox(variables)

    def loss_of(policy):
        m = build(policy)[0]

        def loss(params):
            v = {**variables, "params": params}
            out = m.apply(v, x, train=True, mutable=["batch_stats"])[0]
            return jnp.mean(out**2)

        return loss

    temps, grads = {}, {}
    for policy in ("none", "full", ("full", "none") if build is _resnet else "dots"):
        loss = loss_of(policy)
        compiled = jax.jit(jax.value_and_grad(loss), compiler_options=_KEEP_BARRIERS)
        compiled = compiled.lower(variables["params"]).compile()
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
        grads[policy] = compiled(variables["params"])
    assert temps["full"] < 0.8 * temps["none"], temps
    for policy, (value, g) in grads.items():
        np.testing.assert_allclose(value, grads["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads["none"][1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(policy))


def test_resnet_per_stage_policies_are_checked():
    with pytest.raises(ValueError, match=r"ResNet: remat_policy .* names 3 policies"):
        jnn.resnet_cifar(stage_sizes=(1, 1), remat_policy=("full", "none", "full"))
    with pytest.raises(ValueError, match=r"ViT: unknown remat policy|unknown remat policy 'x'"):
        jnn.ViT(patch_size=4, hidden=8, depth=1, heads=2, mlp_dim=8, remat_policy="x")
