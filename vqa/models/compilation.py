"""``torch.compile`` for the network, with CUDA graphs for the training step where asked.

``mode="reduce-overhead"`` records the compiled forward and backward as CUDA graphs and replays
them: one launch for the thousands of small kernels of a step, which is what a GPU step of this
model spends most of its time on at moderate batch sizes. A graph replays one recorded shape, so
that mode needs every training batch padded to the same shapes (``data.static_shapes``); the
evaluation batches keep their own shapes and run the compiled graphs without CUDA graphs (a
graph per shape would be recorded and kept for every distinct evaluation batch otherwise).
"""

from __future__ import annotations

from typing import Any

from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_network(net: nn.Module, mode: str | None, static_shapes: Any = None) -> nn.Module:
    """Compile ``net`` in place (``nn.Module.compile``: its state-dict keys stay as they are, so
    checkpoints load into an eager model); ``mode=None`` leaves it eager."""
    if mode is None:
        return net
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be null or one of {COMPILE_MODES}, got {mode!r}")
    if mode in CUDA_GRAPH_MODES:
        if not static_shapes:
            raise ValueError(
                f"compile={mode} records CUDA graphs, which replay one batch shape: set "
                "data.static_shapes (e.g. data.static_shapes={questions: 64}) so that every "
                "training batch has the same shapes, or use compile=default"
            )
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraph_skip_dynamic_graphs = True
    net.compile(mode=mode)
    return net
