"""A whole transformer step replayed as one CUDA graph.

A compiled step launches ~900 kernels, and between them runs Python: dynamo's guards on each of the 57
blocks, the custom ops' launchers, the eager embedders. Below ~2500 tokens the step is bound by that
Python. torch.compile's own CUDA graphs (mode="reduce-overhead") graph each block separately and copy
every block's 16-bit activations into the graph's static inputs; capturing the whole forward once per
input shape leaves one replay per step and copies only the step's inputs.

Only small steps are replayed (max_tokens, batch x tokens): on lent H100s a compiled 512^2 step took
37.9-50.7 ms run to run and its replay 32.4-34.9 ms, 512^2 + reference was a wash (52.7 / 51.6 against
55.4 / 50.3 ms), and from 4608 tokens on, where the GPU never waits on Python, replays measured 0-3%
slower than launching the same kernels (benchmarks/results/speed/step_speed_sweep_h100.json and
benchmarks/results/speed/step_speed_graph_threshold_h100.json), so larger steps run the model directly.

A graph holds the addresses of the weights it read: when the model's tensors move (ComfyUI offloads and
reloads models), its graphs are captured again.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[Tensor]
    output: Tensor
    weights: tuple[int, ...]


# Batch x tokens up to which a step is replayed: 1536 (512^2) gained, 2560 was a wash, 4608 (1024^2) lost.
MAX_GRAPHED_TOKENS = 4096


class CUDAGraphedTransformer(nn.Module):
    """model(*inputs) (the engine contract's seven tensors in, tokens out) replayed from a CUDA graph captured
    for each input shape of at most max_tokens (batch x image and text tokens); larger steps run the model
    as it is. At most max_graphs kept, the least recently used dropped first. The first call at a shape runs
    the model warmup_calls times (compiling it, if compiled) and captures it."""

    def __init__(self, model: nn.Module, warmup_calls: int = 2, max_graphs: int = 2,
                 max_tokens: int = MAX_GRAPHED_TOKENS):
        super().__init__()
        if warmup_calls < 1 or max_graphs < 1:
            raise ValueError(f"warmup_calls and max_graphs must be >= 1; got {warmup_calls} and {max_graphs}")
        self.model = model
        self.warmup_calls = warmup_calls
        self.max_graphs = max_graphs
        self.max_tokens = max_tokens
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    @property
    def captured_shapes(self) -> list[tuple]:
        """The input shapes with a graph, least recently used first."""
        return [tuple(shape for shape, _ in key[1:]) for key in self._graphs]

    def release(self) -> None:
        """Drop every graph (and with it its memory pool)."""
        self._graphs.clear()

    @torch.inference_mode()  # one mode for capture and every replay (ComfyUI samples in inference mode)
    def forward(self, *inputs: Tensor) -> Tensor:
        devices = {t.device for t in inputs}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"CUDA graph replay needs every input on one CUDA device; got {sorted(map(str, devices))}")
        img, txt = inputs[0], inputs[2]
        if img.shape[0] * (img.shape[1] + txt.shape[1]) > self.max_tokens:
            return self.model(*inputs)
        key = (next(iter(devices)), *((tuple(t.shape), t.dtype) for t in inputs))
        weights = self._weight_addresses()
        captured = self._graphs.get(key)
        if captured is None or captured.weights != weights:
            self._graphs.pop(key, None)
            captured = self._capture(inputs, weights)
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = captured
        self._graphs.move_to_end(key)
        for static, given in zip(captured.inputs, inputs):
            static.copy_(given)
        captured.graph.replay()
        # The graph writes the same buffer every replay; the caller may hold this step's output past the next.
        return captured.output.clone()

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.model.parameters()) + tuple(t.data_ptr() for t in self.model.buffers())

    def _capture(self, inputs, weights) -> _Captured:
        static = [t.clone() for t in inputs]
        # Warm-up on a side stream, as PyTorch's CUDA graph docs ask: compilation, autotuning and library
        # workspaces happen here, outside the capture.
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                self.model(*static)
        torch.cuda.current_stream(static[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.model(*static)
        return _Captured(graph, static, output, weights)
