"""Calibration pairs -> EncodedPair with the user's own CLIP and VAE, the way a Kontext edit encodes them."""
import numpy as np
import torch
from PIL import Image

from ..engines.calibration import CalibrationPair, EncodedPair
from ..engines.shape_profiles import nearest_kontext_resolution
from ..engines.tokens import pack_latent


def encode_pair(pair: CalibrationPair, clip, vae, model) -> EncodedPair:
    """Reference image scaled to its Kontext resolution (as FluxKontextImageScale does), VAE-encoded,
    put into the model's latent space and packed into tokens; prompt through CLIP-L + T5."""
    image = Image.open(pair.image).convert("RGB")
    width, height = nearest_kontext_resolution(*image.size)
    image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]  # [1, H, W, 3], ComfyUI's IMAGE
    latent = model.model.process_latent_in(vae.encode(pixels))
    tokens, grid = pack_latent(latent)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(pair.prompt))
    txt, extra = cond[0][0], cond[0][1]
    if "pooled_output" not in extra:
        raise ValueError("clip: expected FLUX's text encoders (CLIP-L + T5-XXL) giving a pooled output; "
                         f"this CLIP gave {sorted(extra)}")
    return EncodedPair(txt=txt.cpu(), y=extra["pooled_output"].cpu(), reference=tokens.cpu(), reference_grid=grid,
                       name=pair.name)
