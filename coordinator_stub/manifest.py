"""Model identity digests as the catalog computes them (COORDINATOR.md section 2.2).

The stub's own implementation, written from the Swift
``ModelArtifactVerifier.canonicalArtifactHash`` the section quotes, not from
the provider's code:

* ``macprovider.snapshot-manifest.v1`` of a snapshot directory: every regular
  file under it (hidden ones included, recursively), as
  ``"{path}\\n{size}\\n{sha256}\\n"`` records sorted by relative path, hashed
  with SHA-256. A symlink, a non-regular entry, a hard-linked file or a path
  escaping the directory is an error, never silently skipped.
* ``macprovider.gguf-file.v1`` of a ``.gguf`` file: SHA-256 of its bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .rules import GGUF_FILE_V1, SNAPSHOT_MANIFEST_V1

_READ_SIZE = 1 << 20


class ManifestError(Exception):
    """A model path whose identity cannot be computed (the hash is refused)."""


def _file_sha256(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(_READ_SIZE):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def manifest_entries(directory: str | os.PathLike[str]) -> list[tuple[str, int, str]]:
    """``(relative path, size, sha256)`` of every file, sorted by path."""
    root = Path(directory)
    try:
        root_stat = os.lstat(root)
    except OSError as exc:
        raise ManifestError(f"cannot stat {root}: {exc}") from None
    # The root itself may be a symlink to a directory (Swift resolves the base).
    if stat.S_ISLNK(root_stat.st_mode):
        if not root.resolve().is_dir():
            raise ManifestError(f"{root} is not a directory")
    elif not stat.S_ISDIR(root_stat.st_mode):
        raise ManifestError(f"{root} is not a directory")
    base = os.path.realpath(root)
    entries: list[tuple[str, int, str]] = []

    def fail(error: OSError) -> None:
        raise ManifestError(f"cannot read {error.filename}: {error.strerror}")

    for current, dirs, files in os.walk(base, onerror=fail, followlinks=False):
        for name in sorted(dirs + files):
            path = os.path.join(current, name)
            resolved = os.path.realpath(path)
            if not resolved.startswith(base + os.sep):
                raise ManifestError(f"path escape: {path}")
            relative = resolved[len(base) + 1 :]
            if relative.startswith("/") or ".." in relative.split("/"):
                raise ManifestError(f"unsafe path: {relative}")
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise ManifestError(f"symlink: {path}")
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise ManifestError(f"not a regular file: {path}")
            if info.st_nlink > 1:
                raise ManifestError(f"hard link: {path}")
            size, sha = _file_sha256(path)
            entries.append((relative.replace(os.sep, "/"), size, sha))
    entries.sort(key=lambda entry: entry[0])
    return entries


def manifest_text(entries: list[tuple[str, int, str]]) -> str:
    """The manifest the digest covers: one ``path\\nsize\\nsha\\n`` record per file."""
    return "".join(f"{path}\n{size}\n{sha}\n" for path, size, sha in entries)


def snapshot_manifest_v1(directory: str | os.PathLike[str]) -> str:
    """The ``macprovider.snapshot-manifest.v1`` digest of a snapshot directory."""
    text = manifest_text(manifest_entries(directory))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def gguf_file_v1(path: str | os.PathLike[str]) -> str:
    """The ``macprovider.gguf-file.v1`` digest of a ``.gguf`` file."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError(f"{path} is not a regular file")
    return _file_sha256(os.fspath(path))[1]


def model_identity(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(algorithm, digest)`` of a model directory or ``.gguf`` file."""
    target = Path(path)
    if target.is_file() and target.suffix.lower() == ".gguf":
        return GGUF_FILE_V1, gguf_file_v1(target)
    return SNAPSHOT_MANIFEST_V1, snapshot_manifest_v1(target)
