"""The TensorRT backend's decisions, without a GPU: engine/machine mismatches, profile choice, batch split."""
import pytest

from engines.runtime_tensorrt import Chunk, EngineMismatch, check_engine_metadata, plan_batches
from engines.shape_profiles import ProfileError, ShapeProfile, named_profile

META = {"model_config": {"hidden_size": 3072}, "recipe": {"name": "fp8"},
        "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116"}, "target": "8.9"}


@pytest.mark.parametrize("flavour,version,gpu,message", [
    ("tensorrt", "11.4.0", (8, 9), r"built with tensorrt_rtx 1.7.1.116, but this ComfyUI has tensorrt 11.4.0"),
    ("tensorrt_rtx", "1.8.0", (8, 9), r"built with tensorrt_rtx 1.7.1.116, this ComfyUI has 1.8.0"),
    ("tensorrt_rtx", "1.7.1.116", None, r"run on an NVIDIA GPU; none was found"),
    ("tensorrt_rtx", "1.7.1.116", (12, 0), r"built for GPU '8.9', this GPU is RTX 5090 12.0: rebuild"),
])
def test_mismatches_are_explained(flavour, version, gpu, message):
    with pytest.raises(EngineMismatch, match=message):
        check_engine_metadata(META, flavour, version, gpu, "RTX 5090")


def test_matching_engine_passes_and_rtx_on_hopper_is_refused():
    check_engine_metadata(META, "tensorrt_rtx", "1.7.1.116", (8, 9))
    hopper = dict(META, target="NVIDIA H100 80GB HBM3 9.0")
    with pytest.raises(EngineMismatch, match="does not run on compute capability 9.0"):
        check_engine_metadata(hopper, "tensorrt_rtx", "1.7.1.116", (9, 0))
    with pytest.raises(EngineMismatch, match="does not describe a Kontext"):
        check_engine_metadata({"tensorrt": META["tensorrt"]}, "tensorrt_rtx", "1.7.1.116", (8, 9))


def test_profile_choice_and_batch_split():
    one_ref, two_ref = named_profile("kontext_1ref"), named_profile("kontext_2ref")
    assert plan_batches([one_ref, two_ref], 1, 8192, 512) == [Chunk(0, 0, 1)]
    assert plan_batches([one_ref, two_ref], 2, 12288, 300) == [Chunk(1, 0, 2)]
    # CFG batches cond + uncond; more than the profile's max batch is run in pieces, never refused.
    assert plan_batches([one_ref], 5, 8192, 512) == [Chunk(0, 0, 2), Chunk(0, 2, 4), Chunk(0, 4, 5)]
    with pytest.raises(ProfileError, match=r"image tokens \(target \+ references\) must be within 8084..8300, got 16384"):
        plan_batches([one_ref], 1, 16384, 512)
    with pytest.raises(ProfileError, match=r"text tokens must be within 256..512, got 600"):
        plan_batches([ShapeProfile("p", (1, 1, 2), (10, 20, 30), (256, 512, 512))], 1, 20, 600)


def test_backend_choice():
    from engines.runtime_tensorrt import choose_backend
    from engines.tensorrt_build import TensorRT, TensorRTMissing

    rtx = TensorRT(None, "tensorrt_rtx", "1.7.1.116")
    assert choose_backend("auto", META, rtx, (8, 9))[0] == "tensorrt"
    backend, why = choose_backend("auto", META, rtx, None)
    assert backend == "pytorch" and "none was found" in why
    backend, why = choose_backend("auto", META, TensorRTMissing("no TensorRT is installed"), (8, 9))
    assert backend == "pytorch" and "no TensorRT is installed" in why
    assert choose_backend("pytorch", META, rtx, (8, 9))[0] == "pytorch"
    with pytest.raises(EngineMismatch, match="none was found"):  # asked for TensorRT: no fallback
        choose_backend("tensorrt", META, rtx, None)
    with pytest.raises(ValueError, match="backend: expected"):
        choose_backend("onnx", META, rtx, (8, 9))
