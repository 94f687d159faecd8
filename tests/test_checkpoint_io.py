"""Crash-safe checkpoint writes (vqa/checkpoint_io.py): a SIGKILL mid-save, a failing save or a
leftover temporary file never costs the run a loadable checkpoint."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint

from tests.helpers import CONFIG_DIR, ROOT, compose_config
from vqa.checkpoint_io import AtomicCheckpointIO, remove_stale_temp_files, temp_path_for
from vqa.cli.train import train

TENSORS, NUMEL = 8, 1_000_000  # 32 MB: the write takes long enough to be killed inside
TRAINER_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml"))

# Runs in a child process: saves the checkpoint in `source` to `target` through `io`, and stops
# at `kill_point` (signalling the parent through the `ready` file) to wait for its SIGKILL. The
# mid-write stop is "half the bytes written into the checkpoint folder", whichever call writes
# them: torch.save for AtomicCheckpointIO, the sendfile of shutil.move's cross-device copy for
# Lightning's TorchCheckpointIO (its torch.save goes to memory, its temp file to TMPDIR).
CHILD = r"""
import errno, os, sys, time
from pathlib import Path

import torch

which, source, target, kill_point, ready, simulate_exdev = sys.argv[1:]
folder = os.path.realpath(os.path.dirname(target))


def in_folder(fd):
    return os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")) == folder


def file_in_folder(f):
    try:
        return in_folder(f.fileno())
    except (AttributeError, OSError):  # io.BytesIO: no fd
        return False


def wait_for_kill():
    Path(ready).touch()
    time.sleep(300)
    sys.exit("not killed")


class HalfThenStop:
    def __init__(self, f, total):
        self.f, self.left = f, total // 2

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) >= self.left:
            self.f.write(data[: self.left])
            self.f.flush()
            wait_for_kill()
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


real_save, real_sendfile = torch.save, os.sendfile
real_replace, real_rename = os.replace, os.rename
total = os.path.getsize(source)


def save(obj, f, *args, **kwargs):
    if kill_point == "mid_write" and file_in_folder(f):
        f = HalfThenStop(f, total)
    return real_save(obj, f, *args, **kwargs)


def sendfile(out_fd, in_fd, offset, count):
    if kill_point == "mid_write" and in_folder(out_fd):
        if offset >= total // 2:
            wait_for_kill()
        count = min(count, total // 2 - offset)
    return real_sendfile(out_fd, in_fd, offset, count)


def replace(src, dst):
    if kill_point == "before_rename":
        wait_for_kill()
    real_replace(src, dst)
    if kill_point == "after_rename":
        wait_for_kill()


def rename(src, dst, **kwargs):
    # TMPDIR on the checkpoint's filesystem: make it behave as another filesystem would.
    if simulate_exdev == "1" and os.path.dirname(dst) == folder:
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    return real_rename(src, dst, **kwargs)


torch.save, os.sendfile, os.replace, os.rename = save, sendfile, replace, rename

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from vqa.checkpoint_io import AtomicCheckpointIO

io = AtomicCheckpointIO() if which == "atomic" else TorchCheckpointIO()
io.save_checkpoint(torch.load(source, weights_only=True), target)
"""


class CorruptedCheckpoint(AssertionError):
    """The checkpoint left behind does not load (what the atomic writer must prevent)."""


def make_checkpoint(tag: str) -> dict[str, Any]:
    offset = 0.0 if tag == "old" else 100.0
    return {
        "tag": tag,
        "state_dict": {f"w{i}": torch.full((NUMEL,), offset + i) for i in range(TENSORS)},
    }


def assert_is(loaded: dict[str, Any], tag: str) -> None:
    expected = make_checkpoint(tag)
    assert loaded["tag"] == tag
    assert loaded["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], tensor), name


def load_or_raise(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        size = path.stat().st_size if path.exists() else None
        raise CorruptedCheckpoint(f"{path.name} ({size} bytes) does not load: {err}") from err


@pytest.fixture
def other_tmpdir(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A TMPDIR for the child, on another filesystem than tmp_path when the machine has one
    (/dev/shm); else a sibling folder, and the child simulates the cross-device rename."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        with tempfile.TemporaryDirectory(dir=shm, prefix="vqa-ckpt-test-") as folder:
            yield Path(folder), False
    else:
        folder = tmp_path / "tmpdir"
        folder.mkdir()
        yield folder, True


def kill_while_saving(
    which: str, kill_point: str, folder: Path, tmpdir: Path, simulate_exdev: bool
) -> Path:
    """An existing valid `last.ckpt` in `folder`, overwritten by a child that is SIGKILLed at
    `kill_point`; returns the path of the checkpoint it leaves behind."""
    folder.mkdir(parents=True, exist_ok=True)
    target, ready = folder / "last.ckpt", folder.parent / "ready"
    torch.save(make_checkpoint("old"), target)
    source = folder.parent / "new.pt"
    torch.save(make_checkpoint("new"), source)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    args = [which, str(source), str(target), kill_point, str(ready), str(int(simulate_exdev))]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if ready.exists():
            os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        stderr = child.communicate()[1]
    assert ready.exists(), f"the child never reached {kill_point}:\n{stderr}"
    assert child.returncode == -signal.SIGKILL
    return target


@pytest.mark.skipif(sys.platform != "linux", reason="the kill points hook Linux fds/sendfile")
@pytest.mark.parametrize(
    ("which", "kill_point", "survivor"),
    [
        ("atomic", "mid_write", "old"),
        ("atomic", "before_rename", "old"),
        ("atomic", "after_rename", "new"),
    ],
)
def test_sigkill_mid_save_leaves_a_loadable_checkpoint(
    tmp_path: Path,
    other_tmpdir: tuple[Path, bool],
    which: str,
    kill_point: str,
    survivor: str,
) -> None:
    target = kill_while_saving(which, kill_point, tmp_path / "checkpoints", *other_tmpdir)
    loaded = load_or_raise(target)
    assert_is(loaded, survivor)


@pytest.mark.skipif(sys.platform != "linux", reason="the kill points hook Linux fds/sendfile")
def test_lightnings_own_writer_is_not_crash_safe(
    tmp_path: Path, other_tmpdir: tuple[Path, bool]
) -> None:
    """Why AtomicCheckpointIO exists: TorchCheckpointIO stages the file in another
    filesystem's TMPDIR and moves it by a copy that truncates last.ckpt first, so the same
    kill leaves a last.ckpt that does not load."""
    target = kill_while_saving("lightning", "mid_write", tmp_path / "checkpoints", *other_tmpdir)
    with pytest.raises(CorruptedCheckpoint):
        load_or_raise(target)


@pytest.mark.skipif(sys.platform != "linux", reason="the kill points hook Linux fds/sendfile")
def test_leftover_temp_file_is_invisible_and_cleaned_up(
    tmp_path: Path, other_tmpdir: tuple[Path, bool]
) -> None:
    folder = tmp_path / "checkpoints"
    kill_while_saving("atomic", "mid_write", folder, *other_tmpdir)
    leftovers = [p for p in folder.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.tmp-")
    assert not leftovers[0].name.endswith(".ckpt")

    # what resuming looks for: only the real last.ckpt, never the half-written file
    found = ModelCheckpoint(dirpath=folder)._find_last_checkpoints(trainer=None)  # type: ignore[arg-type]
    assert found == {os.path.normpath(folder / "last.ckpt")}
    assert sorted(folder.glob("**/last.ckpt")) == [folder / "last.ckpt"]

    # the next save removes what the dead writer left behind
    AtomicCheckpointIO().save_checkpoint({"step": 1}, folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True) == {"step": 1}


def test_only_dead_local_writers_temp_files_are_removed(tmp_path: Path) -> None:
    exited = subprocess.Popen([sys.executable, "-c", ""])
    exited.wait()  # reaped: its pid names no process
    live = temp_path_for(tmp_path / "last.ckpt")  # this process: an async save in flight
    dead = tmp_path / live.name.replace(f"-{os.getpid()}-", f"-{exited.pid}-")
    elsewhere = tmp_path / f".last.ckpt.tmp-some.other.host-{exited.pid}-0123abcd"
    unrelated = tmp_path / ".last.ckpt.tmp-notes"
    for path in (live, dead, elsewhere, unrelated):
        path.touch()
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, elsewhere, unrelated)
    )


def fail_mid_write(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04 half a zip file")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["unpicklable", "disk_full"])
def test_failed_save_keeps_previous_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(make_checkpoint("old"), target)
    before = target.read_bytes()

    new = make_checkpoint("new")
    if failure == "unpicklable":
        new["hook"] = lambda: None
        raises = pytest.raises((AttributeError, pickle.PicklingError), match="pickle")
    else:
        monkeypatch.setattr(torch, "save", fail_mid_write)
        raises = pytest.raises(OSError, match="No space left")
    with raises:
        io.save_checkpoint(new, target)
    monkeypatch.undo()

    assert target.read_bytes() == before
    assert_is(io.load_checkpoint(target, weights_only=True), "old")
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_new_file_path_and_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "epoch=0-step=1.ckpt"
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, f"file://{target}")
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_remote_paths_use_lightnings_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = TorchCheckpointIO.save_checkpoint

    def spy(self: TorchCheckpointIO, checkpoint: dict[str, Any], path: Any, **kwargs: Any) -> None:
        calls.append(str(path))
        real(self, checkpoint, path, **kwargs)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", spy)
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.arange(3)}, "memory://ckpts/last.ckpt")
    assert calls == ["memory://ckpts/last.ckpt"]
    assert torch.equal(io.load_checkpoint("memory://ckpts/last.ckpt")["x"], torch.arange(3))
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, "/tmp/never.ckpt", storage_options={"a": 1})


@pytest.mark.parametrize("preset", TRAINER_PRESETS)
def test_every_trainer_preset_writes_atomically(tmp_path: Path, preset: str) -> None:
    cfg = compose_config("train", [f"trainer={preset}"], tmp_path)
    try:
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"  # GPU presets are checked for structure on CPU
            cfg.trainer.devices = 1 if cfg.trainer.get("strategy") in (None, "auto") else 2
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    finally:
        GlobalHydra.instance().clear()
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_fit_saves_through_atomic_checkpoint_io(cfg_train: DictConfig) -> None:
    with open_dict(cfg_train):
        cfg_train.test = False
    _, objects = train(cfg_train)
    assert type(objects["trainer"].strategy.checkpoint_io) is AtomicCheckpointIO

    folder = Path(cfg_train.paths.output_dir) / "checkpoints"
    ckpt = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] > 0 and ckpt["state_dict"]
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
