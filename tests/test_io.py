"""Atomic output files and the output-folder preflight."""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple

import pytest

from prime_eval import io as pio
from prime_eval.errors import UserError


def test_write_json_and_jsonl(tmp_path):
    p = pio.write_json(tmp_path / "sub" / "r.json", {"a": 1.5, "b": "é"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"a": 1.5, "b": "é"}
    q = pio.write_jsonl(tmp_path / "s.jsonl", ({"i": i} for i in range(3)))
    assert [json.loads(line) for line in q.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0o600
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temporary file left


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    pio.write_json(path, {"old": True})

    def rows():
        yield {"i": 0}
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        pio.write_jsonl(path, rows())
    assert json.loads(path.read_text()) == {"old": True}
    with pytest.raises(TypeError):  # not JSON-able: fails before anything is replaced
        pio.write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json"]


def test_disk_full_during_write_is_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    pio.write_json(path, {"old": True})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pio.os, "fsync", full)
    with pytest.raises(UserError, match="no space left"):
        pio.write_json(path, {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json"]


def test_check_output_dir(tmp_path, monkeypatch):
    assert pio.check_output_dir(tmp_path / "a" / "b").is_dir()  # created
    assert not (tmp_path / "c").exists()
    pio.check_output_dir(tmp_path / "c" / "d", create=False)  # checks the nearest existing parent only
    assert not (tmp_path / "c").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        pio.check_output_dir(tmp_path / "f")
    with pytest.raises(UserError, match="cannot create"):
        pio.check_output_dir(tmp_path / "f" / "sub")

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(UserError, match=r"only 5\.0 MiB free .* needs about 64\.0 MiB"):
        pio.check_output_dir(tmp_path / "a")
    pio.check_output_dir(tmp_path / "a", need_bytes=2**20)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            pio.check_output_dir(ro)
        with pytest.raises(UserError, match="cannot write"):
            pio.write_json(ro / "r.json", {})
    finally:
        ro.chmod(0o700)


def test_unwritable_output_dir_simulated(tmp_path, monkeypatch):
    """The same check where the test runs as root (which may write anywhere): creating a file is refused."""
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pio.tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match="not writable"):
        pio.check_output_dir(tmp_path)
    with pytest.raises(UserError, match="cannot write .*Permission denied"):
        pio.write_json(tmp_path / "r.json", {})
