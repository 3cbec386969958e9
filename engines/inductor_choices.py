"""Inductor's choice of persistent reductions for the compiled blocks, through its hook for out-of-tree
heuristics (`InductorChoices`, installed per call with `V.set_choices_handler`).

Inductor makes a reduction persistent (each row held in registers, read once) only up to 1024 elements; the
blocks' LayerNorms (+ modulation + FP8 quantization) reduce over 3072 channels, so by default they loop
over each row twice. Persistent, those kernels took 4.1 against 7.1 ms of an H100 step at 8704 tokens
(then chosen by Inductor's multi-kernel, which compiles both forms and times them:
benchmarks/results/speed/step_speed_reduction_choice_h100.json). Multi-kernel itself cannot stay: torch 2.11
fails to load a cached multi-kernel graph in the next process ("'NoneType' object does not support the
context manager protocol"), and with Inductor's graph cache off instead every ComfyUI start lowers the
blocks again (first step 9.6 against 3.9 s in a second process on the H100). This asks for persistent rows
up to PERSISTENT_ROW_LIMIT elements and leaves every other choice, and the graph cache, to Inductor.

Imported only where blocks are compiled (it imports Inductor).
"""
from __future__ import annotations

from collections.abc import Callable

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

# Flux's hidden width, 3072, rounded up to the power of two a persistent row's block takes.
PERSISTENT_ROW_LIMIT = 4096


class PersistentRowChoices(InductorChoices):
    """Inductor's choices, but rows of up to PERSISTENT_ROW_LIMIT elements reduced in one pass.

    At module level so Inductor can pickle it by name."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs) -> bool:
        if (config.triton.persistent_reductions and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_LIMIT)):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs)


def with_persistent_rows(call: Callable) -> Callable:
    """call (a compiled module's call) run with PersistentRowChoices as Inductor's choices, so the graphs it
    compiles at its first calls get persistent rows; the thread's own choices come back after each call."""
    choices = PersistentRowChoices()

    def run(*args, **kwargs):
        with V.set_choices_handler(choices):
            return call(*args, **kwargs)

    return run
