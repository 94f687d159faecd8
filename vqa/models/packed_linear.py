"""MKL pre-packed linear layers for CPU serving (``Predictor(cpu_packed_linear=True)``).

``nn.Linear`` on the CPU hands MKL the unpacked weight, which MKL re-packs on every call; for the
few rows of one question that re-packing is a large share of the multiply. Packing once at load
trades exact equality with the training path (float rounding) for speed, so it is opt-in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def packed_linear_available() -> bool:
    """This torch build has MKL and its pre-packed linear ops (``torch.ops.mkl``)."""
    return bool(torch._C.has_mkl) and all(
        hasattr(torch.ops.mkl, op) for op in ("_mkl_reorder_linear_weight", "_mkl_linear")
    )


class PackedLinear(nn.Module):
    """An inference-only CPU stand-in for an fp32 :class:`nn.Linear`: its weight packed once
    by MKL (``_mkl_reorder_linear_weight``) instead of on every call, which speeds up the
    few-row matrix multiplies of a single question. Outputs differ from ``nn.Linear``'s by
    float rounding; no autograd."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_hint = rows_hint
        weight = linear.weight.detach().contiguous()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(weight, rows_hint))

    def forward(self, x: Tensor) -> Tensor:
        # MKL uses the packed weight only for exactly ``rows_hint`` rows (any other count
        # falls back to the plain multiply): fewer rows are zero-padded up to it.
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        if 0 < count < self.rows_hint:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, self.rows_hint - count))
        out = torch.ops.mkl._mkl_linear(rows, self.packed, self.weight, self.bias, self.rows_hint)
        return out[:count].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(module: nn.Module, rows_hint: int) -> int:
    """Replace, in place, every fp32 CPU :class:`nn.Linear` under ``module`` by a
    :class:`PackedLinear`; how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if (
            type(child) is nn.Linear
            and child.weight.dtype == torch.float32
            and child.weight.device.type == "cpu"
        ):
            setattr(module, name, PackedLinear(child, rows_hint))
            count += 1
        else:
            count += pack_linears(child, rows_hint)
    return count
