"""LoRA on the PyTorch FP8 backend: the low-rank branch beside each FP8 GEMM (engines/lora.py), no ComfyUI."""
import pytest
import torch
import torch.nn.functional as F
from quant_helpers import encoded_pairs, tiny_model

pytest.importorskip("modelopt.torch.quantization")

from engines.accuracy import step_outputs  # noqa: E402
from engines.lora import (InexpressiblePatch, KeyPatches, LoRAApplier, LoRAUnsupported, LowRankPatch,  # noqa: E402
                          low_rank_factors, merged_state_dict, random_lora, rank_bucket)
from engines.quantize import output_error  # noqa: E402
from engines.runtime_torch import FP8Linear, load_fp8_transformer  # noqa: E402


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from engines.calibrated_state import save_calibrated_state
    from engines.calibration import calibration_forward_loop
    from engines.quantize import quantize_transformer
    from engines.recipes import load_recipe

    tmp = tmp_path_factory.mktemp("lora")
    pairs = encoded_pairs(tmp, n=4)
    model, sd = tiny_model()
    recipe = load_recipe("fp8", attention=True)
    quantize_transformer(model, recipe, calibration_forward_loop(pairs[:3], steps=2))
    return sd, save_calibrated_state(model, recipe, tmp / "state.safetensors"), pairs[3:]


def as_patches(loras, strengths, alpha=None):
    """ComfyUI's way of stacking: each key's patches in order, scale = strength * alpha / rank (alpha None: 1)."""
    patches = {}
    for lora, strength in zip(loras, strengths):
        for key, (up, down) in lora.items():
            scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            patches.setdefault(key, []).append(LowRankPatch(up, down, scale))
    return patches


def key_patches(patches, sd):
    """KeyPatches with the merge above as the exact patch (the 16-bit tensors' weight patch)."""
    return {key: KeyPatches(tuple(entries), lambda w, key=key: merged_state_dict({key: w}, {key: patches[key]})[key])
            for key, entries in patches.items()}


def fp8_model(sd, state):
    """The backend over copies of sd's tensors (the loader reads its own from the file; LoRAs patch 16-bit ones)."""
    return load_fp8_transformer(lambda key: sd[key].clone(), state, dtype=torch.float32)


BLOCK_WEIGHTS = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_mlp.2.weight",
                 "double_blocks.0.img_mod.lin.weight", "single_blocks.0.linear1.weight",
                 "single_blocks.1.linear2.weight", "single_blocks.1.modulation.lin.weight")


def test_stacked_factors_multiply_to_the_sum_of_the_loras_each_on_its_slice():
    g = torch.Generator().manual_seed(0)
    a = LowRankPatch(torch.randn(12, 3, generator=g), torch.randn(3, 8, generator=g), 0.8)
    b = LowRankPatch(torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g), -0.5, offset=(0, 4, 4))
    c = LowRankPatch(torch.randn(12, 1, generator=g), torch.randn(1, 3, generator=g), 2.0, offset=(1, 5, 3))
    down, up = low_rank_factors([a, b, c], 12, 8, rank_bucket(6), torch.float32, "cpu")
    assert down.shape == (16, 8) and up.shape == (12, 16)
    want = torch.zeros(12, 8)
    want += 0.8 * a.up @ a.down
    want[4:8] += -0.5 * b.up @ b.down
    want[:, 5:8] += 2.0 * c.up @ c.down
    assert torch.allclose(up @ down, want, atol=1e-5)
    assert not up[:, 6:].any() and not down[6:].any()  # the padding to the bucket adds nothing
    assert [rank_bucket(r) for r in (1, 16, 17, 48, 64, 65)] == [16, 16, 32, 64, 64, 128]


@torch.no_grad()
def test_patched_fp8_layers_add_the_lora_of_their_16bit_input_and_keep_their_fp8_weights(calibrated):
    sd, state, _ = calibrated
    model = fp8_model(sd, state)
    weights = {n: (m.weight.data_ptr(), m.weight.clone()) for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    fused_weight = model.fused_modulation.weight.clone()
    loras = [random_lora(sd, BLOCK_WEIGHTS, 4, seed=1), random_lora(sd, BLOCK_WEIGHTS[:4], 8, seed=2)]
    patches = as_patches(loras, (0.8, -0.5), alpha=2.0)
    applier = LoRAApplier(model)
    applier.apply(key_patches(patches, sd))

    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear2.weight"):
        layer = model.get_submodule(key[: -len(".weight")])
        x_in = torch.randn(2, 5, layer.weight.shape[1], generator=torch.Generator().manual_seed(4))
        delta = merged_state_dict({key: torch.zeros_like(sd[key])}, {key: patches[key]})[key]
        assert torch.allclose(layer(x_in), layer.fp8_forward(x_in) + F.linear(x_in, delta), rtol=1e-4, atol=1e-4), key
    # The modulation's rows (one fused FP8 weight): each layer gets its own LoRA on silu(vec).
    vec = x[:, 0]
    outs = model.fused_modulation(vec)
    model.fused_modulation.lora_down = None
    plain = model.fused_modulation(vec)
    for i, key in ((0, "double_blocks.0.img_mod.lin.weight"), (3, "single_blocks.1.modulation.lin.weight")):
        delta = merged_state_dict({key: torch.zeros_like(sd[key])}, {key: patches[key]})[key]
        assert torch.allclose(outs[i], plain[i] + F.linear(F.silu(vec), delta), rtol=1e-4, atol=1e-4), key
    for i in (1, 2):  # txt_mod and single block 0's modulation have no LoRA: their outputs are unchanged
        assert torch.equal(outs[i], plain[i])
    for n, m in model.named_modules():
        if isinstance(m, FP8Linear):
            assert m.weight.data_ptr() == weights[n][0] and torch.equal(m.weight.view(torch.uint8),
                                                                        weights[n][1].view(torch.uint8)), n
    assert torch.equal(model.fused_modulation.weight.view(torch.uint8), fused_weight.view(torch.uint8))


@torch.no_grad()
def test_every_block_of_a_kind_gets_a_branch_of_one_width_for_a_role_any_block_patches(calibrated):
    """So all single blocks keep sharing one compiled graph: a LoRA on single block 0's linear1 alone gives block 1's
    linear1 a zero branch of the same width; a layer role no LoRA touches gets none."""
    sd, state, _ = calibrated
    model = fp8_model(sd, state)
    lora = random_lora(sd, ["single_blocks.0.linear1.weight"], 20, seed=5)
    LoRAApplier(model).apply(key_patches(as_patches([lora], [1.0]), sd))
    first, second = model.single_blocks[0].linear1, model.single_blocks[1].linear1
    assert first.lora_down.shape == second.lora_down.shape == (32, 128)
    assert first.lora_up.any() and not second.lora_up.any()
    assert model.single_blocks[0].linear2.lora_down is None and model.double_blocks[0].img_attn.qkv.lora_down is None


def reference_outputs(sd, patches, held, sigmas=(0.9, 0.5)):
    from engines import transformer_from_state_dict

    return step_outputs(transformer_from_state_dict(merged_state_dict(sd, patches)), held, sigmas)


@torch.no_grad()
def test_fp8_model_with_loras_is_as_close_to_the_merged_16bit_model_as_without(calibrated):
    """Two stacked LoRAs (0.8 and -0.5), one on slices of the fused qkv / linear1 as diffusers LoRAs are, and a
    16-bit layer patched exactly: the FP8 backend is as far from the 16-bit model with the LoRAs merged as it is
    from the 16-bit model without them (its quantization error), and far from it when a LoRA is dropped."""
    sd, state, held = calibrated
    hidden = 128
    g = torch.Generator().manual_seed(7)
    first = as_patches([random_lora(sd, BLOCK_WEIGHTS + ("img_in.weight", "final_layer.linear.weight"), 4, 8)], [0.8])
    second = {}
    for key, slices in (("double_blocks.0.txt_attn.qkv.weight", 3), ("single_blocks.1.linear1.weight", 4)):
        for i in range(slices):
            n = hidden * 4 if i == 3 else hidden
            up = torch.randn(n, 4, generator=g) * 0.08
            second.setdefault(key, []).append(LowRankPatch(up, torch.randn(4, hidden, generator=g) * 0.3,
                                                           -0.5, offset=(0, hidden * i, n)))
    patches = {k: first.get(k, []) + second.get(k, []) for k in set(first) | set(second)}

    model = fp8_model(sd, state)
    applier = LoRAApplier(model)
    applier.apply(key_patches(patches, sd))
    got = step_outputs(model, held, (0.9, 0.5))
    want = reference_outputs(sd, patches, held)
    without_first = reference_outputs(sd, second, held)
    applier.remove()
    quantization = {k: output_error(v, step_outputs(model, held, (0.9, 0.5))[k])[1]
                    for k, v in reference_outputs(sd, {}, held).items()}
    for key in want:
        rel = output_error(want[key], got[key])[1]
        dropped = output_error(without_first[key], got[key])[1]
        print(f"{key}: rel {rel:.4f} (no LoRA: {quantization[key]:.4f}); against a dropped LoRA {dropped:.3f}")
        # The branch adds no error of its own beyond float32 noise: within 1.5x the quantization error, which a
        # dropped LoRA exceeds many times over.
        assert rel < 1.5 * quantization[key] and dropped > 5 * rel, key


@torch.no_grad()
def test_a_strength_change_rewrites_the_branch_in_place_and_remove_restores_the_model(calibrated):
    sd, state, held = calibrated
    model = fp8_model(sd, state)
    before = step_outputs(model, held, (0.5,))
    img_in = model.img_in.weight.clone()
    lora = random_lora(sd, BLOCK_WEIGHTS + ("img_in.weight",), 4, seed=9)
    applier = LoRAApplier(model)
    applier.apply(key_patches(as_patches([lora], [0.8]), sd), applied_id="a")
    qkv = model.double_blocks[0].img_attn.qkv
    buffers = (qkv.lora_down.data_ptr(), qkv.lora_up.data_ptr(), model.fused_modulation.lora_up.data_ptr())
    at_08 = step_outputs(model, held, (0.5,))
    applier.apply(key_patches(as_patches([lora], [-0.5]), sd), applied_id="b")
    assert (qkv.lora_down.data_ptr(), qkv.lora_up.data_ptr(), model.fused_modulation.lora_up.data_ptr()) == buffers
    assert applier.applied == "b"
    at_minus_05 = step_outputs(model, held, (0.5,))
    want = reference_outputs(sd, as_patches([lora], [-0.5]), held, (0.5,))
    for key in want:
        assert output_error(want[key], at_minus_05[key])[1] < output_error(want[key], at_08[key])[1] / 5
    applier.remove()
    assert applier.applied is None and qkv.lora_down is None and model.fused_modulation.lora_down is None
    assert torch.equal(model.img_in.weight, img_in)
    after = step_outputs(model, held, (0.5,))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_patch_the_branch_cannot_express_is_refused_on_an_fp8_layer_and_applied_exactly_on_a_16bit_one(calibrated):
    sd, state, _ = calibrated
    model = fp8_model(sd, state)
    applier = LoRAApplier(model)
    lokr = KeyPatches((InexpressiblePatch("lokr"),), lambda w: w * 1.5)
    with pytest.raises(LoRAUnsupported, match=r"lokr patch on single_blocks.0.linear2.weight: that layer is FP8"):
        applier.apply({"single_blocks.0.linear2.weight": lokr, "img_in.weight": lokr})
    assert applier.applied is None and torch.equal(model.img_in.weight, sd["img_in.weight"])  # nothing applied
    reshaped = KeyPatches((InexpressiblePatch("diff"),), lambda w: torch.zeros(w.shape[0] + 1, w.shape[1]))
    lora = key_patches(as_patches([random_lora(sd, ["single_blocks.0.linear2.weight"], 4, seed=1)], [1.0]), sd)
    with pytest.raises(LoRAUnsupported, match=r"patch on img_in.weight: it makes a \(129, 64\) tensor of the \(128, 64\)"):
        applier.apply({**lora, "img_in.weight": reshaped})
    assert model.single_blocks[0].linear2.lora_down is None  # the valid LoRA was not applied either
    with pytest.raises(LoRAUnsupported, match=r"lokr patch on double_blocks.0.txt_mod.lin.weight: that layer is FP8"):
        applier.check({"double_blocks.0.txt_mod.lin.weight": [InexpressiblePatch("lokr")]})
    applier.apply({"img_in.weight": lokr, "single_blocks.0.linear2.bias": lokr,
                   "double_blocks.0.img_mod.lin.bias": lokr, "single_blocks.1.norm.key_norm.scale": lokr})
    assert torch.equal(model.img_in.weight, sd["img_in.weight"] * 1.5)
    assert torch.equal(model.single_blocks[0].linear2.bias, sd["single_blocks.0.linear2.bias"] * 1.5)
    assert torch.equal(model.single_blocks[1].norm.key_norm.scale, sd["single_blocks.1.norm.key_norm.scale"] * 1.5)
    rows = sd["double_blocks.0.img_mod.lin.bias"].shape[0]
    assert torch.equal(model.fused_modulation.bias[:rows], sd["double_blocks.0.img_mod.lin.bias"] * 1.5)
    applier.remove()
    assert torch.equal(model.fused_modulation.bias[:rows], sd["double_blocks.0.img_mod.lin.bias"])


def test_a_lora_of_the_wrong_shape_is_refused_naming_the_layer(calibrated):
    sd, state, _ = calibrated
    applier = LoRAApplier(fp8_model(sd, state))
    bad = LowRankPatch(torch.zeros(100, 2), torch.zeros(2, 128), 1.0)
    with pytest.raises(LoRAUnsupported, match=r"LoRA on single_blocks.0.linear2.weight: up \(100, 2\) @ down"):
        applier.check({"single_blocks.0.linear2.weight": [bad]})
    with pytest.raises(LoRAUnsupported, match=r"slice \(0, 300, 128\) does not fit"):
        applier.check({"double_blocks.0.img_attn.qkv.weight": [
            LowRankPatch(torch.zeros(128, 2), torch.zeros(2, 128), 1.0, offset=(0, 300, 128))]})


@torch.no_grad()
def test_with_compiled_blocks_a_strength_change_compiles_nothing(calibrated):
    """The loader compiles the blocks (compile_blocks); LoRA values change in place, so Dynamo's guards (on which
    layers have a branch and on the branch's shapes) still hold: another strength, or another LoRA of the same
    ranks on the same layers, runs the graphs already compiled, and so does taking the LoRA off again."""
    from torch._dynamo.utils import counters

    from engines.runtime_torch import compile_blocks

    sd, state, held = calibrated
    torch._dynamo.reset()
    model = compile_blocks(fp8_model(sd, state))
    applier = LoRAApplier(model)
    lora = random_lora(sd, BLOCK_WEIGHTS, 4, seed=11)
    other = random_lora(sd, BLOCK_WEIGHTS, 4, seed=12)

    def graphs_compiled_by(patches):
        applier.apply(key_patches(patches, sd))
        before = counters["stats"]["unique_graphs"]
        out = step_outputs(model, held[:1], (0.5,))
        return counters["stats"]["unique_graphs"] - before, out

    assert graphs_compiled_by({})[0] > 0
    assert graphs_compiled_by(as_patches([lora], [0.8]))[0] > 0  # layers gained a branch: compiled once
    compiled, out = graphs_compiled_by(as_patches([lora], [-0.5]))
    assert compiled == 0
    want = reference_outputs(sd, as_patches([lora], [-0.5]), held[:1], (0.5,))
    assert all(output_error(want[k], out[k])[1] < 0.05 for k in want)  # the new strength did apply
    assert graphs_compiled_by(as_patches([lora, other], [0.8, 0.3]))[0] == 0  # rank 8: the same 16 bucket
    assert graphs_compiled_by({})[0] == 0


def test_a_lora_baked_into_an_engine_is_calibrated_with_and_recorded(tmp_path):
    """TensorRT: the build reads the weights with the LoRA merged (source_weights.with_patches; here an fp8_scaled
    file, whose patched layers are quantized again and whose others keep the file's FP8 scales), the request key and
    the sidecar carry the LoRA, and the sidecar's source is the unpatched file."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu12) builds engines on the CPU")
    from checkpoint_files import fp8_scaled_state_dict, save
    from safetensors.torch import load_file

    from engines import random_state_dict, tiny_config
    from engines.build import build_kontext_engine
    from engines.engine_store import EngineStore
    from engines.fp8 import FP8_MAX
    from engines.recipes import load_recipe
    from engines.shape_profiles import named_profile
    from engines.source_weights import open_checkpoint, with_patches
    from engines.tensorrt_build import import_tensorrt

    stored = fp8_scaled_state_dict(random_state_dict(tiny_config(), seed=4))
    path = save(stored, tmp_path / "kontext_fp8_scaled.safetensors")
    pairs = encoded_pairs(tmp_path, n=2)
    store = EngineStore(tmp_path / "tensorrt")
    key = "double_blocks.0.img_attn.qkv.weight"
    with open_checkpoint(path) as weights:
        patches = as_patches([random_lora({key: weights.tensor(key, torch.float32)}, [key], 4, seed=3)], [0.8])
        exact = {k: kp.exact for k, kp in key_patches(patches, {}).items()}
        lora = {"sha256": "f" * 64, "strength": 0.8}

        def build(w, **kw):
            return build_kontext_engine(w, load_recipe("fp8", attention=False), [named_profile("kontext_1ref")], pairs,
                                        steps=1, store=store, compute_capability=(8, 9),
                                        trt=import_tensorrt("tensorrt_rtx"), **kw)

        with pytest.raises(ValueError, match="LoRAs baked in need the unpatched source's description"):
            build(with_patches(weights, exact), loras=[lora])
        baked = build(with_patches(weights, exact), source=weights.describe(), loras=[lora])
        plain = build(weights)
        patched_weight = merged_state_dict({key: weights.tensor(key, torch.float32)}, patches)[key]
    assert baked.engine != plain.engine and "_lora_" in baked.engine.name
    meta = store.read_metadata(baked.engine)
    assert meta["loras"] == [lora] and meta["source"] == store.read_metadata(plain.engine)["source"]
    assert meta["model_fingerprint"] == store.read_metadata(plain.engine)["model_fingerprint"]
    state = load_file(str(baked.calibrated_state))
    amax = state["double_blocks.0.img_attn.qkv.weight_quantizer._amax"].float().reshape(())
    # The patched weight's own range (read in BF16, the 16-bit form of an FP8 source), not the file's FP8 scale.
    assert torch.allclose(amax, patched_weight.to(torch.bfloat16).float().abs().max(), rtol=1e-3)
    assert not torch.allclose(amax, stored["double_blocks.0.img_attn.qkv.scale_weight"] * FP8_MAX, rtol=1e-2)
    other = "single_blocks.0.linear2"  # not patched: its FP8 weights as the file has them, scale pinned
    assert torch.allclose(state[f"{other}.weight_quantizer._amax"].float().reshape(()),
                          stored[f"{other}.scale_weight"].float() * FP8_MAX, rtol=1e-6)


@torch.no_grad()
def test_the_fused_gpu_paths_add_the_same_branch(calibrated, monkeypatch):
    """Where the pack's Triton kernels run, an MLP's GELU + FP8 quantization is one kernel whose 16-bit output is
    never written, and the modulation is one GEMV kernel: the branch is added beside them. With those kernels (and
    the FP8 GEMM) replaced by their PyTorch definitions (the kernels themselves: test_gelu_fp8.py, test_fp8_gemv.py;
    no GPU here), the fused paths compute what the unfused ones do, LoRA included."""
    import engines.runtime_torch as rt
    from engines.fp8 import quantize_fp8

    sd, state, held = calibrated
    model = fp8_model(sd, state)
    keys = BLOCK_WEIGHTS + ("double_blocks.0.img_mlp.2.weight", "single_blocks.0.linear2.weight")
    LoRAApplier(model).apply(key_patches(as_patches([random_lora(sd, keys, 4, seed=13)], [0.8]), sd))
    want = step_outputs(model, held[:1], (0.5,))

    def gelu_fp8(x, scale, prefix):
        return quantize_fp8(torch.cat(([] if prefix is None else [prefix]) + [F.gelu(x, approximate="tanh")], -1), scale)

    def matmul_fp8(self, x8, out_dtype):
        x = (x8.float() * self.input_scale).to(out_dtype)
        return F.linear(x, (self.weight.float() * self.weight_scale).to(out_dtype), self.bias)

    def gemv(x, weight, row_scales, bias):
        return (F.linear(x.float(), weight.float() * row_scales[:, None]) + bias.float()).to(x.dtype)

    used = []
    monkeypatch.setattr(rt, "triton_fp8_kernels_available", lambda device: True)
    monkeypatch.setattr(rt, "fused_gelu_fp8", lambda *a: used.append("gelu") or gelu_fp8(*a))
    monkeypatch.setattr(rt, "fused_fp8_gemv", lambda *a: used.append("gemv") or gemv(*a))
    monkeypatch.setattr(rt.FP8Linear, "matmul_fp8", matmul_fp8)
    got = step_outputs(model, held[:1], (0.5,))
    assert used.count("gemv") == 1 and used.count("gelu") == 2 * len(model.double_blocks) + len(model.single_blocks)
    for key in want:
        assert output_error(want[key], got[key])[1] < 1e-4, key
