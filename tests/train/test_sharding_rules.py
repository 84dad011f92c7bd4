"""config.sharding_rules overrides the logical-axis rules the trainer shards with."""

import pytest
from jax.sharding import PartitionSpec as P

from jaxbatch.train import config as config_lib
from jaxbatch.train import loop


def _kernel_spec(**rules):
    cfg = config_lib.load_config(
        "configs/digits_resnet_lars.py:runlocal", ["mesh.data=1", "mesh.fsdp=8"]
    )
    cfg.sharding_rules.update(rules)  # what a config file does: c.sharding_rules.conv_out = ...
    run = loop.build(cfg)
    return run.state_shardings.params["stage1_block1"]["conv1"]["kernel"].spec


def test_default_rules_shard_conv_out_over_fsdp(eight_devices):
    assert _kernel_spec() == P(None, None, None, "fsdp")


def test_config_override_replicates_conv_out(eight_devices):
    assert _kernel_spec(conv_out=None) in (P(), P(None, None, None, None))


def test_unknown_mesh_axis_in_rules_is_refused(eight_devices):
    with pytest.raises(ValueError, match="pipeline"):
        _kernel_spec(conv_out="pipeline")
