import pytest

from engines.gpu_support import UnsupportedTarget, check_build_target
from engines.recipes import load_recipe
from engines.shape_profiles import ProfileError, kontext_profile, named_profile, nearest_kontext_resolution


@pytest.mark.parametrize("recipe,flavour,cc,message", [
    ("fp8", "tensorrt_rtx", (8, 6), r"recipe fp8 needs compute capability >= 8.9 .*this GPU is 8.6"),
    ("nvfp4", "tensorrt", (9, 0), r"needs compute capability >= 10.0 \(Blackwell\); this GPU is 9.0; use the fp8 recipe"),
    ("fp8", "tensorrt_rtx", (9, 0), r"TensorRT-RTX's runtime does not run on compute capability 9.0"),
    ("fp8", "tensorrt", None, r"no CUDA GPU found"),
])
def test_unsupported_targets_are_refused_up_front(recipe, flavour, cc, message):
    with pytest.raises(UnsupportedTarget, match=message):
        check_build_target(load_recipe(recipe), flavour, cc)


@pytest.mark.parametrize("recipe,flavour,cc", [
    ("fp8", "tensorrt_rtx", (8, 9)), ("fp8", "tensorrt", (9, 0)), ("nvfp4", "tensorrt_rtx", (12, 0)),
    ("svdquant_nvfp4", "tensorrt", (10, 0))])
def test_supported_targets_pass(recipe, flavour, cc):
    check_build_target(load_recipe(recipe), flavour, cc)


def test_profiles_cover_kontext_resolutions_and_name_bad_inputs():
    p = named_profile("kontext_1ref")
    assert p.batch == (1, 1, 2) and p.text_tokens == (256, 512, 512)
    # Kontext's resolutions give 4042..4150 tokens per image (16 px per token side): target + reference.
    assert p.image_tokens == (2 * 4042, 8192, 2 * 4150)
    assert named_profile("kontext_2ref").image_tokens == (3 * 4042, 3 * 4096, 3 * 4150)
    p.check(batch=2, image_tokens=8192, text_tokens=512)
    with pytest.raises(ProfileError, match=r"image tokens \(target \+ references\) must be within 8084..8300, got 12288"):
        p.check(batch=1, image_tokens=12288, text_tokens=512)
    with pytest.raises(ProfileError, match=r"batch must be within 1..2, got 3"):
        p.check(batch=3, image_tokens=8192, text_tokens=512)
    with pytest.raises(ProfileError, match="expected one of"):
        named_profile("huge")
    assert kontext_profile("x", sizes=[(512, 512)]).image_tokens == (2048, 2048, 2048)


def test_nearest_kontext_resolution_matches_comfyui_choice():
    assert nearest_kontext_resolution(1000, 1000) == (1024, 1024)
    assert nearest_kontext_resolution(1920, 1080) == (1392, 752)
    assert nearest_kontext_resolution(600, 1400) == (672, 1568)
