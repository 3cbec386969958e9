from comfy_api.latest import io

from ..engines.model_info import describe_kontext_model
from .comfy_model import diffusion_model_state_dict


class KontextModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextTRT_ModelInfo",
            display_name="Kontext TRT: Model Info",
            category="Kontext TRT",
            description="Checks that a MODEL is a Flux / Kontext transformer this pack can quantize and "
                        "says what it is: blocks, width, parameters and weight dtype.",
            inputs=[io.Model.Input("model", tooltip="A FLUX.1 Kontext [dev] model, as Load Diffusion Model gives it.")],
            outputs=[io.String.Output("info", tooltip="A one-paragraph description of the transformer.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(describe_kontext_model(diffusion_model_state_dict(model)))
