"""The logical-axis table: where each model axis lands, and config overrides."""

import flax.linen as nn
import pytest
from jax.sharding import PartitionSpec as P

from jaxbatch import parallel

R = parallel.DEFAULT_RULES


@pytest.mark.parametrize(
    "names, expected",
    [
        # Activations: the batch takes data and fsdp, so embed (fsdp) stays whole; the sequence
        # goes on context (context parallelism), heads and vocabulary on tensor.
        (("batch", "length", "embed"), P(("data", "fsdp"), "context", None)),
        (("batch", "length", "heads", "kv"), P(("data", "fsdp"), "context", "tensor", None)),
        (("batch", "length", "vocab"), P(("data", "fsdp"), "context", "tensor")),
        (("batch", "length"), P(("data", "fsdp"), "context")),
        # Parameters: FSDP on embed, Megatron on mlp / heads / vocab.
        (("embed", "mlp"), P("fsdp", "tensor")),
        (("mlp", "embed"), P("tensor", "fsdp")),
        (("vocab", "embed"), P("tensor", "fsdp")),
        (("embed", "heads", "kv"), P("fsdp", "tensor", None)),
        (("heads", "kv", "embed"), P("tensor", None, "fsdp")),
        (("embed", "kv"), P("fsdp", "tensor")),
        (("layers", "embed", "mlp"), P(None, "fsdp", "tensor")),
        ((None, None, "conv_in", "conv_out"), P(None, None, None, "fsdp")),
        (("norm",), P(None)),
        (("mlp",), P("tensor")),
    ],
)
def test_default_rules(names, expected):
    assert nn.logical_to_mesh_axes(names, R) == expected


def test_make_rules_overrides_in_place_and_appends():
    rules = parallel.make_rules({"conv_out": "tensor", "embed": None, "expert": ["data"]})
    as_dict = dict(rules)
    assert as_dict["conv_out"] == "tensor"
    assert as_dict["embed"] is None
    assert as_dict["expert"] == "data"
    names = [name for name, _ in rules]
    assert names.index("embed") == [n for n, _ in R].index("embed")  # priority kept
    assert names[-1] == "expert"
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P(None, "tensor")
    # Sequence-of-pairs form (what a ConfigDict list holds) and tuples of mesh axes.
    rules = parallel.make_rules([("batch", ["data"]), ("mlp", ("fsdp", "tensor"))])
    assert dict(rules)["batch"] == "data"
    assert dict(rules)["mlp"] == ("fsdp", "tensor")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embed": "model"}, "logical axis 'embed' is mapped to unknown mesh axis 'model'"),
        ({"mlp": ("tensor", "tensor")}, "repeated mesh axis"),
        ([("mlp", "tensor"), ("mlp", None)], "'mlp' appears more than once"),
        ([("mlp",)], "expected \\(logical name, mesh axes\\) pairs"),
    ],
)
def test_make_rules_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_rules(overrides)
