"""Count what a piece of code asks of the device: kernels (aten ops) and host synchronisations.

A GPU step is fast when the host queues kernels ahead of the device and never waits for it. Two
things break that: many small kernels (each launch costs the host microseconds), and any op whose
result the host must read (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero`` and the boolean
indexing built on it, copies to the CPU). The second kind is visible on a CPU too, because it is
the same op whatever the device: :class:`StepOps` counts both, so a test or a benchmark on this
machine shows what a training step would cost a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops whose output the host must wait for on a GPU: a scalar read back (`.item()`, `bool(t)`,
# `.tolist()` element by element), or an output whose *size* depends on the data (nonzero and
# what is built on it: boolean-mask indexing, masked_select, unique, repeat_interleave without
# output_size).
SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.is_nonzero",
        "aten.item",
        "aten.nonzero",
        "aten.nonzero_static",
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.equal",
    }
)
# Tensor methods that hand data to Python. On a CPU tensor some of them never reach the
# dispatcher (tolist, numpy), so they are counted where Python calls them.
HOST_READ_METHODS = ("item", "tolist", "cpu", "numpy")


def _copies_to_host(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """A copy whose source lives on an accelerator and whose destination is the CPU."""
    if str(func.overloadpacket) not in ("aten._to_copy", "aten.copy_"):
        return False
    sources = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    targets = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if str(func.overloadpacket) == "aten.copy_":  # copy_(dst, src): dst is args[0]
        sources, targets = sources[1:], sources[:1]
    return any(s.device.type not in ("cpu", "meta") for s in sources) and any(
        t.device.type == "cpu" for t in targets
    )


def _size_depends_on_data(func: Any, args: tuple, kwargs: dict) -> bool:
    """Boolean-mask indexing (a nonzero inside ``aten.index``) and ``repeat_interleave`` with
    tensor repeats but no ``output_size``: the output's size is read back from the device."""
    name = str(func.overloadpacket)
    if name in ("aten.index", "aten._unsafe_index"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None
        )
    if name == "aten.repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor"):
        positional = 2 if func._overloadname == "Tensor" else 3
        output_size = kwargs.get(
            "output_size", args[positional] if len(args) > positional else None
        )
        return output_size is None
    return False


@dataclass
class StepOps:
    """What the code inside :func:`count_ops` did: ``ops`` by aten name, ``syncs`` (ops that make
    a GPU host wait, by name), ``host_reads`` (Python calls of ``Tensor.item/tolist/cpu/numpy``).
    """

    ops: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)
    host_reads: Counter[str] = field(default_factory=Counter)

    @property
    def kernels(self) -> int:
        """Every aten op dispatched (views included): a proxy for the kernels a GPU launches."""
        return sum(self.ops.values())

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values()) + sum(self.host_reads.values())


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, record: StepOps) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        self.record.ops[name] += 1
        if (
            name in SYNC_OPS
            or _copies_to_host(func, args, kwargs, out)
            or _size_depends_on_data(func, args, kwargs)
        ):
            self.record.syncs[name] += 1
        return out


@contextlib.contextmanager
def _counting_host_reads(record: StepOps) -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READ_METHODS}

    def counted(name: str) -> Any:
        original = originals[name]

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            record.host_reads[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)

        return method

    try:
        for name in HOST_READ_METHODS:
            setattr(torch.Tensor, name, counted(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_ops() -> Iterator[StepOps]:
    """Count aten ops, host-synchronising ops and host reads of the code run inside::

        with count_ops() as counted:
            loss = module.training_step(batch, 0)
            loss.backward()
        assert counted.host_syncs == 0, counted.syncs + counted.host_reads

    Not thread-safe (it patches ``torch.Tensor`` methods while active): for tests and benchmarks.
    """
    record = StepOps()
    with _counting_host_reads(record), _DispatchCounter(record):
        yield record
