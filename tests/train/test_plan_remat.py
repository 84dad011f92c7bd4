"""`jaxbatch plan` shows the model's remat choices (remat_policy, backprop), for every model."""

import dataclasses
import json
from pathlib import Path

from jaxbatch.train import config as config_lib
from jaxbatch.train import plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_remat_summary_reads_the_model_and_its_towers():
    assert plan.remat_summary({"name": "vit", "hidden": 8}) == "none"
    assert plan.remat_summary({"name": "decoder_lm", "remat_policy": "full"}) == (
        "remat_policy=full"
    )
    dual = {
        "name": "dual_encoder",
        "x_encoder": {"name": "vit", "remat_policy": "offload_qkv_proj"},
        "y_encoder": {"name": "text_encoder", "remat_policy": "none"},
    }
    assert plan.remat_summary(dual) == (
        "x_encoder.remat_policy=offload_qkv_proj, y_encoder.remat_policy=none"
    )
    resnet = {"name": "resnet", "remat_policy": ["full", "none"]}
    assert plan.remat_summary(resnet) == "remat_policy=(full, none)"
    lm = {"remat_policy": "none", "backprop": "streambp"}
    assert plan.remat_summary(lm) == "remat_policy=none, backprop=streambp"


def _plan(remat: str) -> plan.Plan:
    fields = {f.name for f in dataclasses.fields(plan.Plan)} - {"mesh", "collectives", "remat"}
    return plan.Plan(
        **dict.fromkeys(fields, 1), mesh={"data": 1}, collectives={"all-reduce": 0}, remat=remat
    )


def test_format_plan_and_plan_to_dict_show_the_remat_choice():
    p = _plan("remat_policy=save_qkv_offload_mlp_hidden")
    lines = plan.format_plan(p, title="t").splitlines()
    assert any(
        line.split()[0] == "remat" and line.endswith("remat_policy=save_qkv_offload_mlp_hidden")
        for line in lines[1:]
    ), lines
    out = json.loads(json.dumps(plan.plan_to_dict(p)))
    assert out["remat"] == "remat_policy=save_qkv_offload_mlp_hidden"


def test_plan_of_a_config_carries_its_remat_policy(eight_devices):
    cfg = config_lib.load_config(
        str(CONFIGS / "stdlib_lm.py:runlocal"),
        ["model.remat_policy=full", "model.depth=1"],
    )
    p = plan.plan(cfg, devices=eight_devices[:1])
    assert p.remat.startswith("remat_policy=full"), p.remat
    assert "remat_policy=full" in plan.format_plan(p)
