"""The whole-step CUDA graph: replays give what the model computes, for new inputs, new shapes and moved
weights; refusals on the CPU."""
import pytest
import torch

from quant_helpers import CFG, tiny_model

from engines import INPUT_NAMES
from engines.cuda_graph_step import CUDAGraphedTransformer
from engines.tokens import example_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")


def contract_inputs(seed=0, device="cpu", **kw):
    x = example_inputs(CFG, seed=seed, device=device, **kw)
    return [x[k] for k in INPUT_NAMES]


def test_refuses_inputs_off_the_gpu_by_saying_where_they_are():
    graphed = CUDAGraphedTransformer(tiny_model()[0])
    with pytest.raises(ValueError, match=r"needs every input on one CUDA device; got \['cpu'\]"):
        graphed(*contract_inputs())


def test_refuses_settings_that_keep_no_graph():
    with pytest.raises(ValueError, match="warmup_calls and max_graphs must be >= 1; got 1 and 0"):
        CUDAGraphedTransformer(torch.nn.Identity(), warmup_calls=1, max_graphs=0)


@pytest.mark.cuda
@needs_cuda
@torch.no_grad()
def test_replays_compute_what_the_model_computes_for_each_call_inputs():
    model = tiny_model(device="cuda")[0].eval()
    graphed = CUDAGraphedTransformer(model)
    first, second = contract_inputs(seed=1, device="cuda"), contract_inputs(seed=2, device="cuda")
    out_first = graphed(*first)
    out_second = graphed(*second)  # the same shapes: a replay of the one graph, on the new inputs
    assert len(graphed.captured_shapes) == 1
    # The same kernels as an uncaptured call, so the same bits.
    assert torch.equal(out_first, model(*first)) and torch.equal(out_second, model(*second))
    assert not torch.equal(out_first, out_second)  # the first output was not overwritten by the replay


@pytest.mark.cuda
@needs_cuda
@torch.no_grad()
def test_a_new_shape_gets_its_own_graph_and_the_oldest_is_dropped():
    model = tiny_model(device="cuda")[0].eval()
    graphed = CUDAGraphedTransformer(model, max_graphs=2)
    grids = [(4, 4), (4, 6), (6, 6)]
    for grid in grids:
        x = contract_inputs(device="cuda", target=grid)
        assert torch.equal(graphed(*x), model(*x))
    tokens = [2 * rows * cols for rows, cols in grids]  # the edit's tokens and a same-size reference's
    assert [shape[0][1] for shape in graphed.captured_shapes] == tokens[1:]
    graphed.release()
    assert graphed.captured_shapes == []


@pytest.mark.cuda
@needs_cuda
@torch.no_grad()
def test_weights_that_moved_are_read_from_where_they_are_now():
    """ComfyUI offloads a model and loads it back: a graph still reading the old addresses would compute on
    freed memory."""
    model = tiny_model(device="cuda")[0].eval()
    graphed = CUDAGraphedTransformer(model)
    x = contract_inputs(device="cuda")
    want = model(*x)
    assert torch.equal(graphed(*x), want)
    before = [p.data_ptr() for p in model.parameters()]
    graphed.cpu()
    # NaNs where the weights were: a graph still reading there would give NaNs.
    fillers = [torch.full_like(p, float("nan"), device="cuda") for p in model.parameters()]
    graphed.cuda()
    assert [p.data_ptr() for p in model.parameters()] != before
    assert torch.equal(graphed(*x), want)
    del fillers


@pytest.mark.cuda
@needs_cuda
@torch.no_grad()
def test_steps_above_max_tokens_run_the_model_directly():
    model = tiny_model(device="cuda")[0].eval()
    x = contract_inputs(device="cuda")  # 32 image + 8 text tokens
    graphed = CUDAGraphedTransformer(model, max_tokens=39)
    assert torch.equal(graphed(*x), model(*x)) and graphed.captured_shapes == []
    graphed.max_tokens = 40
    assert torch.equal(graphed(*x), model(*x)) and len(graphed.captured_shapes) == 1
