"""The transformer against ComfyUI's own comfy.ldm.flux.model.Flux, through ComfyUI's forward.

ComfyUI packs the latent and its reference latents into tokens and ids (offset / index / uxo) and
calls forward_orig; this pack replaces only forward_orig. So: run ComfyUI's forward once as it is
and once with forward_orig answered by our transformer on the same weights, and compare.
Runs when a ComfyUI checkout is importable (COMFYUI_PATH), skips with the reason otherwise.
"""
import pytest
import torch

from comfyui_checkout import flux_unet_config, import_comfyui
from engines import random_state_dict, tiny_config, transformer_from_state_dict
from engines.tokens import edit_ids

REL_L2_TOL = 1e-5  # float32; ComfyUI's CPU attention path differs from SDPA in summation order only


@pytest.fixture(scope="module")
def models():
    import_comfyui()
    import comfy.ldm.flux.model
    import comfy.ops

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=2)
    unet_config = flux_unet_config(cfg)
    unet_config.pop("image_model")
    comfy_flux = comfy.ldm.flux.model.Flux(**unet_config, dtype=torch.float32, device="cpu",
                                           operations=comfy.ops.disable_weight_init)
    comfy_flux.load_state_dict(sd, strict=True)
    ours = transformer_from_state_dict(sd)
    return cfg, comfy_flux.eval(), ours


def comfy_forward(flux, ours, x, refs, method, swap):
    kwargs = dict(ref_latents=refs, ref_latents_method=method)
    seen = {}
    original = flux.forward_orig

    def forward_orig(img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options={}, attn_mask=None):
        seen.update(img_ids=img_ids, n_txt=txt.shape[1])
        if swap:
            return ours(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        return original(img, img_ids, txt, txt_ids, timesteps, y, guidance, control, transformer_options, attn_mask)

    flux.forward_orig = forward_orig
    try:
        out = flux(x["latent"], x["sigma"], x["context"], y=x["y"], guidance=x["guidance"],
                   transformer_options={}, **kwargs)
    finally:
        del flux.forward_orig
    return out, seen


def latents(cfg, batch, hw, ref_hws, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(
        latent=torch.randn(batch, 16, *hw, generator=g),
        refs=[torch.randn(1, 16, *r, generator=g).expand(batch, -1, -1, -1) for r in ref_hws],
        sigma=torch.tensor([0.9, 0.4][:batch]),
        context=torch.randn(batch, 6, cfg.context_in_dim, generator=g),
        y=torch.randn(batch, cfg.vec_in_dim, generator=g),
        guidance=torch.tensor([2.5, 4.0][:batch]),
    )


@pytest.mark.parametrize("method", ["offset", "index", "uxo"])
@pytest.mark.parametrize("ref_hws", [[(8, 6)], [(8, 8), (4, 6)]], ids=["one_ref", "two_refs"])
@torch.no_grad()
def test_forward_orig_swap_matches_comfyui(models, method, ref_hws):
    cfg, flux, ours = models
    x = latents(cfg, batch=2, hw=(6, 8), ref_hws=ref_hws, seed=5)
    expected, seen = comfy_forward(flux, ours, x, x["refs"], method, swap=False)
    out, seen_swapped = comfy_forward(flux, ours, x, x["refs"], method, swap=True)
    assert out.shape == expected.shape == x["latent"].shape
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < REL_L2_TOL, f"{method}: relative L2 {rel:.3g}"
    # The reference tokens really were there (an edit, not text-to-image): more ids than target tokens.
    n_target = (6 // 2) * (8 // 2)
    assert seen["img_ids"].shape[1] == n_target + sum((h // 2) * (w // 2) for h, w in ref_hws)


@pytest.mark.parametrize("method", ["offset", "index"])
def test_edit_ids_match_comfyui_packing(models, method):
    """The pack's own id layout (used for calibration, demo, benchmarks) is ComfyUI's."""
    cfg, flux, ours = models
    ref_hws = [(8, 8), (4, 6)]
    x = latents(cfg, batch=1, hw=(6, 8), ref_hws=ref_hws, seed=6)
    _, seen = comfy_forward(flux, ours, x, x["refs"], method, swap=False)
    ids = edit_ids((3, 4), [(h // 2, w // 2) for h, w in ref_hws], method=method)
    assert torch.equal(seen["img_ids"][0].float(), ids)


@torch.no_grad()
def test_dropping_references_changes_the_output(models):
    """Guards the test above against a swap that ignored the reference tokens."""
    cfg, flux, ours = models
    x = latents(cfg, batch=1, hw=(6, 8), ref_hws=[(8, 6)], seed=7)
    with_ref, _ = comfy_forward(flux, ours, x, x["refs"], "offset", swap=True)
    without, _ = comfy_forward(flux, ours, x, None, "offset", swap=True)
    assert ((with_ref - without).norm() / without.norm()).item() > 1e-2
