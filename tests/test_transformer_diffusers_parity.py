"""The transformer against diffusers' FluxTransformer2DModel, weights carried over by diffusers' own
BFL-checkpoint converter.

That converter hardcodes inner_dim = 3072, so this model has Kontext's real width and heads
(3072, 24 x 128, RoPE axes 16/56/56) with one block of each kind and small text/vec widths:
~0.5 B parameters in float32, a few seconds on a 2-core CPU.
"""
import pytest
import torch

from engines import KontextConfig, random_state_dict, transformer_from_state_dict
from engines.tokens import example_inputs

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402

# float32 end to end; measured 3e-7 relative L2 here. A real mistake (a swapped shift/scale, a
# wrong RoPE pairing, text/image order) moves it by orders of magnitude.
REL_L2_TOL = 2e-6
MAX_ABS_TOL = 2e-5


@pytest.fixture(scope="module")
def pair():
    cfg = KontextConfig(vec_in_dim=64, context_in_dim=64, depth=1, depth_single_blocks=1)
    sd = random_state_dict(cfg, seed=1)
    ours = transformer_from_state_dict(sd)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))  # it pops from the dict given
    with torch.device("meta"):
        ref = FluxTransformer2DModel(
            in_channels=64, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_in_dim, pooled_projection_dim=cfg.vec_in_dim,
            guidance_embeds=True, axes_dims_rope=cfg.axes_dim)
    ref.load_state_dict(converted, strict=True, assign=True)
    return cfg, ours, ref.eval()


def run_diffusers(ref, x):
    # diffusers takes ids without the batch axis (shared by the batch); ours carries them per sample.
    return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
               timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
               guidance=x["guidance"], return_dict=False)[0]


def assert_close(out, ref):
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < REL_L2_TOL, f"relative L2 {rel:.3g} >= {REL_L2_TOL}"
    assert (out - ref).abs().max().item() < MAX_ABS_TOL


@pytest.mark.parametrize("target,references,n_txt", [
    ((3, 4), [(4, 3)], 7),          # one reference of another aspect
    ((4, 4), [(4, 4), (2, 3)], 5),  # two references
])
@torch.no_grad()
def test_matches_diffusers_batch2_with_references(pair, target, references, n_txt):
    cfg, ours, ref = pair
    x = example_inputs(cfg, batch=2, target=target, references=references, n_txt=n_txt, seed=3)
    assert x["guidance"][0] != x["guidance"][1] and x["timesteps"][0] != x["timesteps"][1]
    out = ours(**x)
    expected = run_diffusers(ref, x)
    assert out.shape == expected.shape == (2, x["img"].shape[1], 64)
    assert_close(out, expected)
    # Per-sample guidance really reaches each sample: sample 1 alone gives sample 1's rows.
    single = {k: v[1:] for k, v in x.items()}
    assert_close(ours(**single)[0], expected[1])
