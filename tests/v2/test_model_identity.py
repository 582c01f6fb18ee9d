"""snapshot-manifest.v1 and gguf-file.v1: the vectors, the refusals, the cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from provider.host import model_identity as mi


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_one_file_vector_from_the_spec(tmp_path: Path) -> None:
    # COORDINATOR.md section 2.2: one file "a" holding "x".
    write(tmp_path / "m" / "a", b"x")
    identity = mi.model_identity(tmp_path / "m")
    assert identity.algorithm == "macprovider.snapshot-manifest.v1"
    assert identity.hash == "e5a512d0669d449f2a2e5e590310e67fad7f8eceaa5887933377fc30b8e4f6fa"
    assert mi.manifest_text([("a", 1, hashlib.sha256(b"x").hexdigest())]) == (
        "a\n1\n2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881\n"
    )


def test_hidden_files_and_subdirectories_are_in_sorted_by_path(tmp_path: Path) -> None:
    root = tmp_path / "m"
    files = {".gitattributes": b"*", "config.json": b"{}", "sub/w.safetensors": b"abc", "Z": b""}
    for name, data in files.items():
        write(root / name, data)
    records = [(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()]
    text = "".join(f"{p}\n{n}\n{h}\n" for p, n, h in sorted(records))
    assert text.startswith(".gitattributes\n")  # code-point order: "." < "Z" < "c" < "s"
    identity = mi.model_identity(root)
    assert identity.hash == hashlib.sha256(text.encode()).hexdigest()
    assert (identity.files, identity.bytes) == (4, 6)


def test_a_symlinked_root_is_resolved(tmp_path: Path) -> None:
    write(tmp_path / "real" / "a", b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert mi.model_identity(tmp_path / "link").hash == mi.model_identity(tmp_path / "real").hash


def test_hugging_face_cache_snapshot_is_refused_with_the_fix(tmp_path: Path) -> None:
    blob = write(tmp_path / "blobs" / "abc", b"weights")
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    with pytest.raises(mi.ModelIdentityError, match="symlink") as caught:
        mi.model_identity(snap)
    assert "--local-dir" in str(caught.value)


def test_hard_links_are_refused(tmp_path: Path) -> None:
    first = write(tmp_path / "m" / "a", b"x")
    os.link(first, tmp_path / "m" / "b")
    with pytest.raises(mi.ModelIdentityError, match="hard link"):
        mi.model_identity(tmp_path / "m")


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(mi.ModelIdentityError, match="local-dir"):
        mi.model_identity("mlx-community/Qwen3-32B-4bit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(mi.ModelIdentityError, match="no files"):
        mi.model_identity(tmp_path / "empty")


def test_gguf_is_the_file_hash(tmp_path: Path) -> None:
    path = write(tmp_path / "model.gguf", b"GGUF" + b"\0" * 100)
    identity = mi.model_identity(path)
    assert identity.algorithm == "macprovider.gguf-file.v1"
    assert identity.hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_skips_reading_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = tmp_path / "m", tmp_path / "cfg"
    weights = write(root / "w.safetensors", b"abc")
    first = mi.model_identity(root, cache_dir=cache)
    assert (cache / mi.CACHE_FILE).exists()
    reads: list[str] = []
    real = mi._sha256_file

    def counting(path: str) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(mi, "_sha256_file", counting)
    assert mi.model_identity(root, cache_dir=cache) == first and reads == []
    weights.write_bytes(b"abd")  # same size, new mtime
    os.utime(weights, ns=(0, 10**9))
    changed = mi.model_identity(root, cache_dir=cache)
    assert changed.hash != first.hash and reads
