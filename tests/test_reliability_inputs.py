"""Inputs refused early, as the pack's own error naming the input, what was expected and what came: names that would
leave the engine folder, recipe options of the wrong kind, empty images, texts and batches, and images whose history
sheet would take gigabytes; and a runtime cache removal that must not reach another engine's cache."""
import json
import re

import pytest
import torch

from engines.contract import KontextInputError, check_inputs
from engines.edit_turns import EditInputError, EditTurn, check_turn_source, history_sheet
from engines.recipes import RECIPE_DIR, RecipeError, parse_recipe
from engines.shape_profiles import ProfileError, ShapeProfile, nearest_kontext_resolution
from engines.tokens import example_inputs
from quant_helpers import CFG


def shipped(name):
    return json.loads((RECIPE_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", "..", "x\\..\\y", "", ".hidden"])
def test_a_recipe_name_that_would_leave_the_engine_folder_is_refused(name):
    data = dict(shipped("fp8"), name=name)
    with pytest.raises(RecipeError, match=rf"my.json: field 'name' must be letters, digits, '_' and '-'.* got "
                                          rf"{re.escape(repr(name))}"):
        parse_recipe(data, source="my.json")


def test_an_engine_name_from_an_unchecked_recipe_still_cannot_leave_the_store(tmp_path, pairs_dir, monkeypatch,
                                                                             refuse_calibration):
    """A Recipe made in code skips parse_recipe; the build refuses its name before calibrating and writes nothing."""
    import dataclasses

    import fault_children
    from engines.recipes import load_recipe

    monkeypatch.setattr("engines.recipes.load_recipe",
                        lambda *a, **k: dataclasses.replace(load_recipe(*a, **k), name="../../../escaped"))
    root = tmp_path / "a" / "b" / "tensorrt"
    with pytest.raises(ValueError, match=r"recipe name: expected a name of letters, digits, '_', '-' and '.' \(no "
                                         r"'\.\.'.*got '\.\./\.\./\.\./escaped'"):
        fault_children.build(root, pairs_dir)
    assert not any(tmp_path.rglob("*escaped*"))


@pytest.mark.parametrize("lowrank, expected", [
    (-5, "must be a rank from 1 to 4096, got -5"), (0, "must be a rank from 1 to 4096, got 0"),
    (True, "must be int, got bool"), (32.0, "must be int, got float")])
def test_an_svdquant_rank_that_is_not_a_positive_integer_is_refused(lowrank, expected):
    data = shipped("svdquant_nvfp4")
    data["algorithm"]["lowrank"] = lowrank
    with pytest.raises(RecipeError, match=rf"svd.json: field 'algorithm.lowrank' {re.escape(expected)}"):
        parse_recipe(data, source="svd.json")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ""])
def test_a_profile_name_that_would_leave_the_engine_folder_is_refused(name):
    with pytest.raises(ProfileError, match=rf"profile name: expected a name of letters, digits.* got {re.escape(repr(name))}"):
        ShapeProfile(name, (1, 1, 2), (8, 16, 32), (4, 8, 8))


def test_removing_an_engines_earlier_runtime_caches_never_touches_another_engines(tmp_path):
    """`kontext[1]` is a glob character class matching `kontext1`: the name must be matched literally."""
    import hashlib
    from types import SimpleNamespace

    from engines.tensorrt_runtime_cache import RuntimeCacheFile, runtime_cache_path

    engine = tmp_path / "kontext[1].engine"
    other = runtime_cache_path(tmp_path / "kontext1.engine", "c" * 64)
    other.write_bytes(b"kernels of another engine")
    earlier = runtime_cache_path(engine, "0" * 64)
    earlier.write_bytes(b"kernels of this engine's earlier build")
    cache = RuntimeCacheFile(engine, hashlib.sha256(b"x").hexdigest())
    cache.cache = SimpleNamespace(serialize=lambda: b"kernels compiled now")
    cache.save()
    assert cache.path.read_bytes() == b"kernels compiled now" and not earlier.exists()
    assert other.read_bytes() == b"kernels of another engine"


def turn(image, parent=None, source=None):
    return EditTurn(latent=torch.zeros(1, 16, 2, 2), image=image, instruction="make it dusk", seed=0, steps=4,
                    guidance=2.5, parent=parent, source_image=source)


def test_a_very_wide_turn_image_makes_a_bounded_history_sheet():
    wide = torch.rand(1, 16, 16384, 3)  # as a 16384x16 image: its panel alone would be 393216 pixels wide
    sheet = history_sheet(turn(torch.rand(1, 64, 64, 3), source=wide).history())
    assert sheet.shape[1] == 384 + 56 and sheet.shape[2] <= 4 * 384 + 384
    tall = torch.rand(1, 16384, 16, 3)
    assert history_sheet(turn(tall).history()).shape[2] >= 1


@pytest.mark.parametrize("shape", [(1, 0, 0, 3), (1, 0, 64, 3), (1, 64, 0, 3), (0, 64, 64, 3)])
def test_an_empty_image_is_refused_naming_the_input(shape):
    with pytest.raises(EditInputError, match=r"image: expected a non-empty IMAGE"):
        check_turn_source(torch.zeros(shape), None)
    with pytest.raises(EditInputError, match=r"turn 1 image: expected a non-empty IMAGE"):
        history_sheet(turn(torch.zeros(shape)).history())


def test_an_empty_image_has_no_kontext_resolution():
    with pytest.raises(ProfileError, match=r"image: expected at least 1x1 pixels .* got 0x0"):
        nearest_kontext_resolution(0, 0)


def test_an_empty_text_or_batch_is_refused_at_the_contract():
    x = example_inputs(CFG, batch=1, target=(2, 2), references=[(2, 2)], n_txt=4)
    empty_text = dict(x, txt=x["txt"][:, :0], txt_ids=x["txt_ids"][:, :0])
    with pytest.raises(KontextInputError, match=r"txt: expected at least one text token .*got \(1, 0, 48\)"):
        check_inputs(CFG, **empty_text)
    empty_batch = {k: v[:0] for k, v in x.items()}
    with pytest.raises(KontextInputError, match=r"img: expected a batch of at least one sample, got \(0, 8, 64\)"):
        check_inputs(CFG, **empty_batch)
