"""The served model's identity: ``macprovider.snapshot-manifest.v1`` or ``gguf-file.v1``.

The coordinator routes a model only when the provider reports the hash the
signed catalog lists for it (``model_sha256``). The hash is over the model
exactly as published:

- a directory (``macprovider.snapshot-manifest.v1``): every regular file
  below it, hidden ones included, as ``"{path}\\n{size}\\n{sha256}\\n"``
  records sorted by relative path, then SHA-256 of the concatenation;
- a ``.gguf`` file (``macprovider.gguf-file.v1``): SHA-256 of the file.

A symlink, a hard link (``st_nlink > 1``), anything that is not a regular
file, or a path outside the directory makes the directory unhashable, with
a message saying how to make a real copy: a Hugging Face cache snapshot is
all symlinks into ``../../blobs``.

Hashing reads every byte, so :func:`model_identity` keeps the result in a
cache file (in the config directory) keyed by the directory's real path and
each file's path, size and modification time: a restart, or a reconnect,
stats the files and reads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GGUF_FILE_V1",
    "SNAPSHOT_MANIFEST_V1",
    "ModelIdentity",
    "ModelIdentityError",
    "manifest_text",
    "model_identity",
]

SNAPSHOT_MANIFEST_V1 = "macprovider.snapshot-manifest.v1"
GGUF_FILE_V1 = "macprovider.gguf-file.v1"
CACHE_FILE = "model-identity.json"
_CHUNK = 8 * 1024 * 1024
_MATERIALISE = (
    "make a real copy, e.g. `huggingface-cli download <repo> --local-dir <dir>` "
    "(or `hf download <repo> --local-dir <dir>`), and set model to that directory"
)


class ModelIdentityError(Exception):
    """The model cannot be hashed as published; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelIdentity:
    """``model_hash`` and ``model_hash_algorithm`` as the coordinator reads them."""

    hash: str
    algorithm: str
    files: int
    bytes: int


@dataclass(frozen=True)
class _Entry:
    path: str  # relative, "/"-separated
    absolute: str
    size: int
    mtime_ns: int


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(root: Path) -> list[_Entry]:
    """Every file below ``root`` (hidden ones too), refusing what the manifest refuses."""
    base = os.path.realpath(root)
    try:
        top = os.lstat(base)
    except OSError as exc:
        raise ModelIdentityError(f"cannot read model directory {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        raise ModelIdentityError(f"{root} is not a directory")
    entries: list[_Entry] = []
    pending = [base]
    while pending:
        directory = pending.pop()
        try:
            items = list(os.scandir(directory))
        except OSError as exc:
            raise ModelIdentityError(f"cannot list {directory}: {exc.strerror}") from None
        for item in items:
            rel = os.path.relpath(item.path, base).replace(os.sep, "/")
            if rel.startswith("../") or rel == ".." or os.path.isabs(rel):
                raise ModelIdentityError(f"{item.path} is outside {root}; {_MATERIALISE}")
            info = item.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                raise ModelIdentityError(
                    f"{rel} in {root} is a symlink (a Hugging Face cache snapshot is all "
                    f"symlinks), so the model cannot be hashed as published; {_MATERIALISE}"
                )
            if stat.S_ISDIR(info.st_mode):
                pending.append(item.path)
                continue
            if not stat.S_ISREG(info.st_mode):
                raise ModelIdentityError(f"{rel} in {root} is not a regular file; remove it")
            if info.st_nlink > 1:
                raise ModelIdentityError(
                    f"{rel} in {root} is a hard link ({info.st_nlink} names), so the model "
                    f"cannot be hashed as published; {_MATERIALISE}"
                )
            entries.append(_Entry(rel, item.path, info.st_size, info.st_mtime_ns))
    entries.sort(key=lambda e: e.path)
    return entries


def manifest_text(records: list[tuple[str, int, str]]) -> str:
    """The snapshot manifest of ``(path, size, sha256)`` records (sorted here)."""
    return "".join(f"{path}\n{size}\n{sha}\n" for path, size, sha in sorted(records))


def _signature(kind: str, base: str, entries: list[_Entry]) -> str:
    stamp = [[e.path, e.size, e.mtime_ns] for e in entries]
    raw = json.dumps([kind, base, stamp], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_identity(model: str | Path, *, cache_dir: Path | None = None) -> ModelIdentity:
    """Hash the model at ``model`` (a directory or a ``.gguf`` file); blocking.

    With ``cache_dir``, a result whose signature (real path, and every file's
    relative path, size and mtime) is unchanged comes from
    ``cache_dir/model-identity.json`` without reading a byte of the model.
    Raises :class:`ModelIdentityError` with the reason and the fix.
    """
    root = Path(model).expanduser()
    if root.is_file() and root.suffix == ".gguf":
        real = os.path.realpath(root)
        info = os.stat(real)
        entries = [_Entry(os.path.basename(real), real, info.st_size, info.st_mtime_ns)]
        kind = GGUF_FILE_V1
    elif root.is_dir():
        entries = _walk(root)
        if not entries:
            raise ModelIdentityError(f"model directory {root} holds no files")
        real = os.path.realpath(root)
        kind = SNAPSHOT_MANIFEST_V1
    else:
        raise ModelIdentityError(
            f"{root} is neither a model directory nor a .gguf file; a model given as a "
            f"Hugging Face repo id lives in its cache as symlinks: {_MATERIALISE}"
        )
    cache_path = cache_dir / CACHE_FILE if cache_dir is not None else None
    cache = _read_cache(cache_path)
    signature = _signature(kind, real, entries)
    hit = cache.get(real)
    total = sum(e.size for e in entries)
    if isinstance(hit, dict) and hit.get("signature") == signature:
        return ModelIdentity(str(hit["hash"]), kind, len(entries), total)
    if kind == GGUF_FILE_V1:
        digest = _sha256_file(entries[0].absolute)
    else:
        records = [(e.path, e.size, _sha256_file(e.absolute)) for e in entries]
        digest = hashlib.sha256(manifest_text(records).encode("utf-8")).hexdigest()
    if cache_path is not None:
        cache[real] = {"signature": signature, "hash": digest, "algorithm": kind}
        try:
            _write_cache(cache_path, cache)
        except OSError:
            pass  # only a missed shortcut next time
    return ModelIdentity(digest, kind, len(entries), total)
