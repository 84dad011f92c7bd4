"""The trainer's contrastive step runs the Pallas kernels in the device ring, and says so.

``configs/siglip_pod.py:runlocal`` on the 8 simulated devices, its train step built from shapes
(``plan.lower_step``) and lowered for TPU and CUDA from this CPU host. ``jax.default_backend`` is
patched to the target's as on a TPU/GPU host, where 'auto' picks the kernels; the lowering then
runs the real Mosaic TPU / Triton lowerings, so a ring that silently used the XLA tiles (no
custom call) fails here.
"""

import jax
import ml_collections
import pytest

from jaxbatch import parallel
from jaxbatch.train import config as config_lib
from jaxbatch.train import plan, tasks

SIGLIP = "configs/siglip_pod.py:runlocal"
TARGETS = [
    ("tpu", "tpu", "tpu_custom_call"),
    ("gpu", "cuda", "__gpu$xla.gpu.triton"),
]


def _lowered(mesh_overrides, platform):
    cfg = config_lib.load_config(SIGLIP, list(mesh_overrides))
    run, lowered = plan.lower_step(cfg, lowering_platforms=(platform,))
    return run, lowered.as_text()


CASES = [(*target, ("mesh.data=8",)) for target in TARGETS] + [
    (*TARGETS[0], ("mesh.data=2", "mesh.fsdp=4"))
]


@pytest.mark.parametrize("backend,platform,custom_call,mesh", CASES)
def test_siglip_pod_step_calls_the_kernels_in_the_ring(
    monkeypatch, eight_devices, backend, platform, custom_call, mesh
):
    del eight_devices
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    run, text = _lowered(mesh, platform)
    assert run.task.choices["loss.implementation"] == "pallas"
    assert backend in run.task.choices["loss.implementation.reason"]
    assert f"custom_call @{custom_call}(" in text, "the ring ran without the Pallas kernels"
    assert "collective_permute" in text  # and it is the ring: y blocks travel between devices


def test_auto_on_cpu_chooses_the_xla_tiles_and_the_program_agrees(eight_devices):
    del eight_devices
    run, text = _lowered(("mesh.data=8",), "tpu")
    choices = run.task.choices
    assert choices["loss.implementation"] == "xla"
    assert "cpu" in choices["loss.implementation.reason"]
    assert "ring over data × fsdp = 8" in choices["loss.implementation.reason"]
    assert "tpu_custom_call" not in text and "collective_permute" in text


def _loss_cfg(implementation, block_size=0):
    return ml_collections.ConfigDict(
        dict(kind="sigmoid", block_size=block_size, implementation=implementation)
    )


def test_explicit_pallas_that_cannot_run_fails_naming_why(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    # TPU tiles must be multiples of 128: a block of 100 over 130 local rows cannot run.
    with pytest.raises(ValueError, match=r"'pallas' cannot run on backend 'tpu'.*multiples of 128"):
        tasks.choose_contrastive_implementation(_loss_cfg("pallas", 100), 130, 16)
    with pytest.raises(ValueError, match=r"\[8, 16\] float64.*float32"):
        tasks.choose_contrastive_implementation(_loss_cfg("pallas"), 8, 16, "float64")
    # 'auto' moves on to the XLA tiles, and says why.
    impl, reason = tasks.choose_contrastive_implementation(_loss_cfg("auto", 100), 130, 16)
    assert impl == "xla" and "multiples of 128" in reason


def test_explicit_pallas_that_cannot_run_fails_when_the_task_is_built(monkeypatch, eight_devices):
    del eight_devices
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    cfg = config_lib.load_config(
        SIGLIP,
        [
            "loss.implementation=pallas",
            "loss.block_size=100",
            "batch_size=1040",
            "total_samples=2080",
        ],
    )
    with pytest.raises(ValueError, match="multiples of 128"):
        tasks.make_task(cfg, parallel.make_mesh(data=8))


def test_explicit_pallas_on_cpu_is_the_interpreter_not_a_fallback():
    impl, reason = tasks.choose_contrastive_implementation(
        _loss_cfg("pallas"), 8, 16, backend="cpu"
    )
    assert impl == "pallas" and "interpreter" in reason
    for kept in ("xla", "reference"):
        assert tasks.choose_contrastive_implementation(_loss_cfg(kept), 8, 16)[0] == kept
