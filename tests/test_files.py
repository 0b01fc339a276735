"""Whole files replaced at once: a reader sees the old file or the new one, and a failed write leaves nothing."""

import threading

import pytest

from classforge.core.files import write_atomically


def test_a_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path):
    path = tmp_path / "cache.json"
    path.write_bytes(b"old")
    write_atomically(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "model.json"
    target.mkdir()  # a folder in the way: the rename fails
    (target / "inside").write_text("x")
    with pytest.raises(OSError):
        write_atomically(target, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"] and target.is_dir()


def test_writers_at_once_never_mix_their_bytes(tmp_path):
    path = tmp_path / "shared.bin"
    blobs = [bytes([i]) * 2_000_000 for i in range(8)]
    errors = []

    def write(blob):
        try:
            write_atomically(path, blob)
        except OSError as e:
            errors.append(e)

    for _ in range(5):
        threads = [threading.Thread(target=write, args=(b,)) for b in blobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert path.read_bytes() in blobs
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]
