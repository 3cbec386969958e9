"""Edit nodes that chain: one node per turn, the previous turn wired into the next.

Each turn is ComfyUI's own Kontext recipe (text encode, ReferenceLatent, FluxGuidance, KSampler with
euler / simple at CFG 1, VAE decode), done by ComfyUI's functions, so any MODEL works: the quantized
one from the loader or the original. ComfyUI's cache re-runs only the turns whose inputs changed.
"""
import torch
from comfy_api.latest import io, ui

import comfy.model_base
import comfy.utils
import node_helpers
import nodes as comfy_nodes

from ..engines.edit_turns import (EditInputError, EditTurn, check_image, check_instruction, check_latent_format,
                                  check_turn_source, history_sheet)
from ..engines.shape_profiles import nearest_kontext_resolution

Turn = io.Custom("KONTEXT_EDIT_TURN")
REFERENCE_METHODS = ["offset", "index", "uxo"]


def check_kontext_model(model) -> None:
    config = getattr(getattr(model, "model", None), "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    if not isinstance(model.model, comfy.model_base.Flux) or unet.get("image_model") != "flux" or not unet.get("guidance_embed"):
        got = type(getattr(model, "model", model)).__name__
        raise EditInputError(f"model: expected a FLUX.1 Kontext [dev] model (Flux with a guidance embedder), got {got}")


def scaled(image: torch.Tensor, resize: str) -> torch.Tensor:
    height, width = image.shape[1], image.shape[2]
    if resize == "kontext":
        width, height = nearest_kontext_resolution(width, height)
    else:  # keep the size, cropped to whole 16-pixel latent patches
        width, height = width // 16 * 16, height // 16 * 16
        if not width or not height:
            raise EditInputError(f"image: expected at least 16x16 pixels, got {image.shape[2]}x{image.shape[1]}")
    return comfy.utils.common_upscale(image[..., :3].movedim(-1, 1), width, height, "lanczos", "center").movedim(1, -1)


class KontextEditTurn(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_EditTurn",
            display_name="Kontext TRT: Edit Turn",
            category="Kontext TRT",
            description="One edit instruction applied to a source image (first turn) or to the previous turn. Chain "
                        "turns for a multi-turn edit; the result passes to the next turn as a latent (no VAE round "
                        "trip), and the turn carries the history. Shows its result, so each turn can be queued on "
                        "its own (the Kontext Edit chat panel does).",
            # An output node with a preview: queueing one turn (ComfyUI's partial execution) runs it and whatever
            # it needs, nothing else, and its image reaches the frontend in ComfyUI's `executed` event.
            is_output_node=True,
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],  # the preview PNG carries the workflow, as PreviewImage's does
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 Kontext [dev]: the quantized MODEL from Load Quantized Model, or "
                                                "the original."),
                io.Clip.Input("clip", tooltip="FLUX's text encoders (CLIP-L + T5-XXL)."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (16 latent channels)."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip="What to change, e.g. 'make it dusk'. Kontext keeps the rest of the image."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=24, min=1, max=100, tooltip="Kontext [dev] works well with 20-28."),
                io.Float.Input("guidance", default=2.5, min=0.0, max=10.0, step=0.1,
                               tooltip="FLUX guidance (as FluxGuidance); 2.5 is Kontext's usual value."),
                io.Image.Input("image", optional=True, tooltip="First turn: the image to edit. Leave empty on later turns."),
                Turn.Input("previous", optional=True, tooltip="Later turns: the turn to continue from."),
                io.Image.Input("extra_reference", optional=True,
                               tooltip="Optional extra reference image for this turn (e.g. an object to insert)."),
                io.Combo.Input("resize", options=["kontext", "keep"], default="kontext",
                               tooltip="First turn: kontext scales the image to the nearest resolution Kontext was "
                                       "trained on (as FluxKontextImageScale); keep crops to 16-pixel multiples."),
                io.Combo.Input("reference_method", options=REFERENCE_METHODS, default="offset",
                               tooltip="How ComfyUI places several reference latents (FluxKontextMultiReferenceLatentMethod)."),
            ],
            outputs=[io.Image.Output("edited", tooltip="This turn's result, decoded."),
                     Turn.Output("turn", tooltip="Wire into the next turn's 'previous' or into Edit History.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, instruction, seed, steps, guidance, image=None, previous=None,
                extra_reference=None, resize="kontext", reference_method="offset") -> io.NodeOutput:
        instruction = check_instruction(instruction)
        check_turn_source(image, previous)
        if extra_reference is not None:
            check_image(extra_reference, "extra_reference")
        check_kontext_model(model)
        check_latent_format(getattr(vae, "latent_channels", None))

        source = None
        if previous is None:
            source = scaled(image[:1], resize)
            reference = vae.encode(source)
        else:
            reference = previous.latent
        references = [reference]
        if extra_reference is not None:
            references.append(vae.encode(scaled(extra_reference[:1], resize)))

        positive = clip.encode_from_tokens_scheduled(clip.tokenize(instruction))
        positive = node_helpers.conditioning_set_values(positive, {"reference_latents": references}, append=True)
        positive = node_helpers.conditioning_set_values(positive, {"guidance": guidance,
                                                                   "reference_latents_method": reference_method})
        negative = comfy_nodes.ConditioningZeroOut().zero_out(positive)[0]  # unused at CFG 1
        latent = {"samples": torch.zeros_like(reference)}
        samples = comfy_nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", positive, negative,
                                              latent)[0]["samples"]
        decoded = vae.decode(samples)
        turn = EditTurn(latent=samples, image=decoded[:1], instruction=instruction, seed=seed, steps=steps,
                        guidance=guidance, parent=previous, source_image=source)
        return io.NodeOutput(decoded, turn, ui=ui.PreviewImage(decoded[:1], cls=cls))


class KontextEditHistory(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_EditHistory",
            display_name="Kontext TRT: Edit History",
            category="Kontext TRT",
            description="Every turn up to this one side by side with its instruction, and the list of turns.",
            inputs=[Turn.Input("turn", tooltip="The last turn of a chain (or of one branch).")],
            outputs=[io.Image.Output("sheet", tooltip="Source and turns side by side, captioned."),
                     io.String.Output("history", tooltip="One line per turn: instruction, seed, steps, guidance.")],
        )

    @classmethod
    def execute(cls, turn) -> io.NodeOutput:
        if not isinstance(turn, EditTurn):
            raise EditInputError(f"turn: expected a Kontext edit turn, got {type(turn).__name__}")
        return io.NodeOutput(history_sheet(turn.history()), turn.describe())
