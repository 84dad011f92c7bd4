"""Remat policies by name: same gradients as no remat, and the policy really is applied."""

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import POLICY_NAMES, DecoderLM, get_policy

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


def _unstack(params):
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(SMALL["depth"]):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params


# Every policy inside nn.scan; the unrolled path (prevent_cse=True) with two of them.
@pytest.mark.parametrize(
    "scan_layers,policies",
    [(True, POLICY_NAMES), (False, ("full", "save_qkv_proj"))],
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
