"""Atomic writes: permissions follow the umask like a normal file, failures leave no trace."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from sdtrain.atomic import atomic_path, save_safetensors, write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.toml", "x = 1\n")
        save_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(2)})
        (tmp_path / "plain.txt").write_text("reference")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "a.toml").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == mode


def test_a_failed_write_leaves_the_target_and_no_temp_file(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
