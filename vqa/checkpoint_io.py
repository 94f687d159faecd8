"""Crash-safe checkpoint files: a kill mid-save never leaves a checkpoint that fails to load.

Lightning's :class:`~lightning_fabric.plugins.io.TorchCheckpointIO` writes through an fsspec
transaction whose temporary file comes from ``tempfile.mkstemp()`` (the system temp dir) and is
committed with ``shutil.move``. When the temp dir is on another filesystem (a tmpfs ``/tmp``, a
node-local disk next to a network share) the move is a copy that first truncates the target,
so a job killed during that copy (preemption, OOM killer, wall-time limit) leaves a truncated
``last.ckpt`` and nothing to resume from; nothing is fsynced either, so a power loss can do the
same after the move. :class:`AtomicCheckpointIO` writes next to the target instead, fsyncs,
then renames over it: a reader sees the old file or the new one, never a mix.

Wired into every trainer preset by ``configs/trainer/default.yaml`` (``plugins:``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

TEMP_MARKER = ".tmp-"
# Long ModelCheckpoint names (metrics in the file name) plus the suffix must stay under NAME_MAX.
_MAX_NAME_IN_TEMP = 100
_MAX_HOST_IN_TEMP = 64
# `.{name}.tmp-{host}-{pid}-{token}`: the leading dot and the trailing token mean a leftover
# never ends in `.ckpt` nor starts with `last`, so ModelCheckpoint's `last*.ckpt` discovery and
# this project's `**/last.ckpt` hints never pick one up.
_TEMP_RE = re.compile(r"^\..*\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:_MAX_HOST_IN_TEMP]


def temp_path_for(target: Path) -> Path:
    """A fresh temporary name in ``target``'s folder (same filesystem, so the rename is atomic)."""
    token = secrets.token_hex(4)  # several writers in one process (async checkpointing) never clash
    name = f".{target.name[:_MAX_NAME_IN_TEMP]}{TEMP_MARKER}{_host()}-{os.getpid()}-{token}"
    return target.with_name(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temporary files that killed writers of this host left in ``folder``.

    Only files whose writer pid is gone are removed; a pid that belongs to another host (a shared
    filesystem) cannot be checked from here and is left alone. Best effort: never raises.
    """
    if os.name == "nt":  # os.kill(pid, 0) terminates the process on Windows
        return []
    host, removed = _host(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):  # a concurrent cleaner got there first
            os.remove(entry.path)
            removed.append(Path(entry.path))
    return removed


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    # Some filesystems (network mounts) refuse to fsync a directory; the new file is already in
    # place by then, so failing the save over the rename's durability would be worse.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, target: str | os.PathLike[str]) -> None:
    """``torch.save(obj, target)`` such that ``target`` is always the old or the new file.

    Written to a temporary file in the same folder, flushed and fsynced, renamed over
    ``target`` (atomic on POSIX and Windows within a filesystem), then the folder is fsynced so
    the rename itself survives a power loss. On any error the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target.parent)
    tmp = temp_path_for(target)
    # 0o666 through the umask: the permissions a plain open() would give the checkpoint.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:  # KeyboardInterrupt too: no half-written file left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves are atomic (see :func:`atomic_torch_save`).

    Remote (non-local fsspec) paths and ``storage_options`` go to Lightning's implementation:
    object stores publish an upload only once it completes, so they have no torn-file problem.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, local_path)
