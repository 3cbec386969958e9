"""The exported ONNX (float32, no Q/DQ) runs in onnxruntime on the CPU and matches the torch transformer
at other batch sizes and token counts than it was traced with: the dynamic axes really are dynamic."""
import numpy as np
import pytest
import torch

from engines import INPUT_NAMES, random_state_dict, tiny_config, transformer_from_state_dict
from engines.onnx_export import export_onnx
from engines.tokens import example_inputs

ort = pytest.importorskip("onnxruntime")


@torch.no_grad()
def test_float_onnx_matches_torch_at_other_shapes(tmp_path):
    cfg = tiny_config()
    model = transformer_from_state_dict(random_state_dict(cfg))
    path = export_onnx(model, tmp_path / "kontext.onnx", batch=1, target=(4, 4), n_txt=8)
    import onnx

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 20
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES) and [o.name for o in proto.graph.output] == ["out"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, target, refs, n_txt in [(2, (3, 5), [(4, 4)], 11), (1, (6, 2), [(2, 2), (3, 3)], 5)]:
        x = example_inputs(cfg, batch=batch, target=target, references=refs, n_txt=n_txt, seed=4)
        (out,) = session.run(["out"], {k: v.numpy() for k, v in x.items()})
        want = model(**x).numpy()
        assert out.shape == want.shape == (batch, x["img"].shape[1], cfg.out_channels)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
