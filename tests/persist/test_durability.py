"""Nothing lost or corrupted on disk (issue 15): a flipped bit inside a stored tensor is refused by
the checksum, naming the file; a save that raises or is killed midway leaves the previous file
intact; format-2 files (no checksum) still load."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import fntk
from fntk import persist
from fntk.persist.hashing import payload_checksum

from models import tanh_mlp

F64 = torch.float64
g = torch.Generator().manual_seed(8)
X = torch.randn(20, 3, dtype=F64, generator=g)
XT = torch.randn(4, 3, dtype=F64, generator=g)
Y = torch.sin(X[:, 0]) + 0.05 * torch.randn(20, dtype=F64, generator=g)
TESTS = Path(__file__).resolve().parents[1]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return tanh_mlp(d_in=3, width=8).to(F64)


def _storage_offset(path: Path) -> tuple[int, int]:
    """(offset, size) in the file of the largest tensor storage record of a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_one_flipped_bit_in_a_tensor_is_refused(tmp_path):
    m = mlp()
    reg = fntk.NTKRegressor(m, space="function").fit(X, Y)
    path = tmp_path / "reg.fntk"
    reg.save(path)
    start, size = _storage_offset(path)
    data = bytearray(path.read_bytes())
    data[start + size // 2] ^= 0x01  # one bit of one float64 inside the largest stored tensor
    path.write_bytes(bytes(data))
    payload = torch.load(path, weights_only=True)  # torch itself reads it without complaint
    assert isinstance(payload["tensors"], dict)
    with pytest.raises(ValueError, match="checksum") as info:
        fntk.load(path, m)
    assert str(path) in str(info.value)


def test_format_2_files_without_checksum_still_load(tmp_path):
    m = mlp()
    reg = fntk.NTKRegressor(m, space="weight").fit(X, Y)
    path = tmp_path / "reg.fntk"
    reg.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["checksum"] == payload_checksum(payload["meta"], payload["state"], payload["tensors"])
    del payload["checksum"]
    payload["meta"] = payload["meta"].replace('"format_version": 3', '"format_version": 2')
    old = tmp_path / "old.fntk"
    torch.save(payload, old)
    assert torch.equal(fntk.load(old, m).predict(XT).mean, reg.predict(XT).mean)
    payload["meta"] = payload["meta"].replace('"format_version": 2', '"format_version": 3')
    torch.save(payload, old)  # format 3 without its checksum: refused
    with pytest.raises(ValueError, match="checksum is missing"):
        fntk.load(old, m)


def test_save_raising_midway_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    m = mlp()
    first = fntk.NTKRegressor(m, optimize=False).fit(X, Y)
    path = tmp_path / "reg.fntk"
    first.save(path)
    before = path.read_bytes()
    second = fntk.NTKRegressor(m).fit(X, -Y)
    real_save = torch.save

    def failing_save(obj, fh, *a, **kw):  # writes half of the file, then the disk "fills up"
        real_save(obj, fh, *a, **kw)
        fh.truncate(fh.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        second.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["reg.fntk"]  # the temporary file is gone
    assert torch.equal(fntk.load(path, m).predict(XT).mean, first.predict(XT).mean)
    second.save(path)  # a later save replaces it whole
    assert torch.equal(fntk.load(path, m).predict(XT).mean, second.predict(XT).mean)


KILLED = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import fntk
    from models import tanh_mlp
    torch.manual_seed(0)
    m = tanh_mlp(d_in=3, width=8).to(torch.float64)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 3, dtype=torch.float64, generator=g)
    reg = fntk.NTKRegressor(m).fit(x, -torch.sin(x[:, 0]))
    real = torch.save

    def slow_save(obj, fh, *a, **kw):  # write part of the file, then hang until killed
        real(obj, fh, *a, **kw)
        fh.truncate(fh.tell() // 3)
        fh.flush()
        print("writing", flush=True)
        time.sleep(120)

    torch.save = slow_save
    reg.save(sys.argv[1])
    """
)


def test_save_killed_midway_leaves_the_previous_file_intact(tmp_path):
    m = mlp()
    first = fntk.NTKRegressor(m).fit(X, Y)
    path = tmp_path / "reg.fntk"
    first.save(path)
    before = path.read_bytes()
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=str(TESTS)))
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"  # inside the write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert torch.equal(fntk.load(path, m).predict(XT).mean, first.predict(XT).mean)
    leftovers = [p for p in os.listdir(tmp_path) if p not in ("reg.fntk", "killed.py")]
    assert all(p.startswith(".reg.fntk.") and p.endswith(".tmp") for p in leftovers), leftovers


def test_atomic_write_keeps_permissions_and_refuses_bad_paths(tmp_path):
    target = tmp_path / "a.bin"
    persist.atomic_write(target, lambda fh: fh.write(b"one"))
    os.chmod(target, 0o640)
    persist.atomic_write(target, lambda fh: fh.write(b"two"))
    assert target.read_bytes() == b"two" and (target.stat().st_mode & 0o777) == 0o640
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        persist.atomic_write(target / "x", lambda fh: fh.write(b""))
    with pytest.raises(TypeError, match="file name"):
        persist.atomic_write(3, lambda fh: fh.write(b""))
