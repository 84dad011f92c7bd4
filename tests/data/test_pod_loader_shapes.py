"""The pod datasets' loaders produce exactly the shapes `jaxbatch plan` compiles for."""

import pytest

from jaxbatch.data import registry
from jaxbatch.train import config as config_lib
from jaxbatch.train import shapes

CASES = [
    ("imagenet_resnet50_lars.py", "imagenet_like_dir", ["dataset.options.format=array_record"]),
    ("siglip_pod.py", "image_text_dir", []),
    ("bert_lamb.py", "bert_pretraining_dir", []),
]


@pytest.mark.parametrize("config, fixture, extra", CASES)
def test_loader_shapes_match_what_the_planner_assumes(request, config, fixture, extra):
    data_dir = request.getfixturevalue(fixture)
    cfg = config_lib.load_config(
        f"configs/{config}:runlocal", [f"dataset.options.data_dir={data_dir}", *extra]
    )
    planned = shapes.example_shapes(cfg)
    for split in ("train", "test"):
        got = registry.load_split(cfg.dataset.name, split, **cfg.dataset.options).examples([0])
        assert {k: (v.shape[1:], v.dtype) for k, v in got.items()} == {
            k: (s.shape, s.dtype) for k, s in planned.items()
        }
