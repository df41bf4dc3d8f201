"""The stage cache: what identifies an entry, and that entries are restored whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploytool import cache
from deploytool.cache import StageCache, content_hash, stage_key


def test_content_hash_covers_a_folder_s_file_names_and_contents(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.npy").write_bytes(b"1")
    (folder / "sub" / "b.npy").write_bytes(b"2")
    first = content_hash(folder)
    assert content_hash(folder) == first
    (folder / "sub" / "b.npy").write_bytes(b"3")
    assert content_hash(folder) != first
    (folder / "sub" / "b.npy").write_bytes(b"2")
    (folder / "sub" / "b.npy").rename(folder / "sub" / "c.npy")
    assert content_hash(folder) != first  # a renamed file is other data (image folders: names are labels)


def test_stage_key_changes_with_stage_config_inputs_and_deploytool_s_source(monkeypatch: pytest.MonkeyPatch) -> None:
    key = stage_key("export", {"opset": 18}, {"model": "abc"})
    assert key == stage_key("export", {"opset": 18}, {"model": "abc"})
    assert len({key, stage_key("simplify", {"opset": 18}, {"model": "abc"}), stage_key("export", {"opset": 17}, {"model": "abc"}),
                stage_key("export", {"opset": 18}, {"model": "abd"})}) == 4
    monkeypatch.setattr(cache, "source_digest", lambda: "other code")
    assert stage_key("export", {"opset": 18}, {"model": "abc"}) != key


def test_an_entry_missing_an_output_file_is_a_miss_and_a_hit_restores_every_output(tmp_path: Path) -> None:
    store = StageCache(tmp_path / ".cache")
    outputs = [tmp_path / "model.onnx", tmp_path / "extra.bin"]
    calls: list[int] = []

    def compute() -> dict[str, object]:
        calls.append(1)
        for path in outputs:
            path.write_bytes(path.name.encode())
        return {"nodes": 3}

    assert store.run("export", "k1", outputs, compute) == ({"nodes": 3}, False)
    for path in outputs:
        path.unlink()
    assert store.run("export", "k1", outputs, compute) == ({"nodes": 3}, True)
    assert [p.read_bytes() for p in outputs] == [b"model.onnx", b"extra.bin"] and calls == [1]
    (tmp_path / ".cache" / "export" / "k1" / "extra.bin").unlink()  # an entry damaged by hand
    assert store.lookup("export", "k1", outputs) is None


def test_a_failed_compute_stores_nothing(tmp_path: Path) -> None:
    store = StageCache(tmp_path / ".cache")

    def compute() -> dict[str, object]:
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError):
        store.run("export", "k1", [tmp_path / "model.onnx"], compute)
    assert not (tmp_path / ".cache" / "export" / "k1").exists()
