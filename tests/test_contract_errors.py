"""Bad input to the transformer is refused with the input's name, what was expected and what came."""
import pytest
import torch

from engines import KontextInputError, random_state_dict, tiny_config, transformer_from_state_dict
from engines.tokens import example_inputs

CFG = tiny_config()


@pytest.fixture(scope="module")
def model():
    return transformer_from_state_dict(random_state_dict(CFG))


def inputs(**changes):
    x = example_inputs(CFG, batch=2)
    x.update(changes)
    return x


@pytest.mark.parametrize("name,bad,message", [
    ("img", torch.zeros(2, 32, 63), r"img: expected \[B, N, 64\].*got \(2, 32, 63\)"),
    ("img", torch.zeros(2, 64), r"img: expected \[B, N, 64\].*got \(2, 64\)"),
    ("img_ids", torch.zeros(2, 32, 2), r"img_ids: expected \[B, N, 3\] = \(2, 32, 3\).*got \(2, 32, 2\)"),
    ("img_ids", torch.zeros(32, 3), r"img_ids: expected \[B, N, 3\].*got \(32, 3\)"),
    ("txt", torch.zeros(2, 8, 4096), r"txt: expected \[B, T, 48\].*got \(2, 8, 4096\)"),
    ("txt", torch.zeros(1, 8, 48), r"txt: expected batch 2 to match img, got batch 1"),
    ("txt_ids", torch.zeros(2, 7, 3), r"txt_ids: expected \[B, T, 3\] = \(2, 8, 3\).*got \(2, 7, 3\)"),
    ("timesteps", torch.zeros(1), r"timesteps: expected \[B\] = \(2,\).*got \(1,\)"),
    ("timesteps", torch.zeros(2, dtype=torch.long), r"timesteps: expected a floating-point tensor"),
    ("y", torch.zeros(2, 768), r"y: expected \[B, 32\] = \(2, 32\).*got \(2, 768\)"),
    ("guidance", torch.zeros(3), r"guidance: expected \[B\] = \(2,\).*got \(3,\)"),
    ("guidance", None, r"guidance: expected a torch.Tensor, got a NoneType"),
])
def test_bad_input_is_named(model, name, bad, message):
    with pytest.raises(KontextInputError, match=message):
        model(**inputs(**{name: bad}))


def test_good_input_runs(model):
    out = model(**inputs())
    assert out.shape == (2, 32, 64)
