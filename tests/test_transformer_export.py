"""The forward traces as one graph with batch and token counts dynamic (what ONNX export needs)."""
import torch
from torch.export import Dim

from engines import random_state_dict, tiny_config, transformer_from_state_dict
from engines.tokens import example_inputs


@torch.no_grad()
def test_torch_export_with_dynamic_batch_and_tokens():
    cfg = tiny_config()
    model = transformer_from_state_dict(random_state_dict(cfg))
    batch, n_img, n_txt = Dim("batch", min=1, max=4), Dim("n_img", min=2, max=4096), Dim("n_txt", min=2, max=512)
    shapes = dict(img={0: batch, 1: n_img}, img_ids={0: batch, 1: n_img}, txt={0: batch, 1: n_txt},
                  txt_ids={0: batch, 1: n_txt}, timesteps={0: batch}, y={0: batch}, guidance={0: batch})
    exported = torch.export.export(model, (), example_inputs(cfg, batch=2), dynamic_shapes=shapes)
    # Other batch, other image and text token counts, through the same exported graph.
    for batch_size, target, refs, n in [(1, (3, 5), [(4, 4)], 11), (3, (2, 2), [], 3)]:
        x = example_inputs(cfg, batch=batch_size, target=target, references=refs, n_txt=n, seed=9)
        got = exported.module()(**x)
        want = model(**x)
        assert got.shape == want.shape == (batch_size, x["img"].shape[1], cfg.out_channels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
