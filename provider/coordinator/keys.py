"""The provider's long-lived keys, in the config directory, mode 0600, never logged.

- ``receipt.ed25519``: the Ed25519 receipt key, made once and kept. It signs
  settlement receipts (key id ``ed25519-sha256:<hex>``) and, for a credential
  bootstrap, the bootstrap proof; losing it loses the provider's identity.
- ``admission.ed25519`` and ``admission-next.ed25519`` (only with
  ``admission_identity = true``): a durable admission identity and its
  pre-generated successor. The coordinator asks for a signature by the key
  it has on file; after it rotates to the next key, that key becomes
  current and a new next key is made.

Each file holds the 32-byte private seed, base64, written atomically with
mode 0600 (the directory 0700). A key file readable by others is refused,
with the ``chmod`` to run, rather than trusted. The per-connection X25519
keys never touch the disk (:func:`provider.coordinator.tier2.generate_key`).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provider.coordinator.receipts import public_key_bytes, receipt_key_id

__all__ = ["DEFAULT_KEY_DIR", "KeyFileError", "KeyStore"]

DEFAULT_KEY_DIR = Path("~/.config/mlx-provider")
RECEIPT_KEY = "receipt.ed25519"
ADMISSION_KEY = "admission.ed25519"
ADMISSION_NEXT_KEY = "admission-next.ed25519"


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and the fix."""


def _seed(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def b64(data: bytes) -> str:
    """Standard base64, padded (how the coordinator takes Ed25519 public keys)."""
    return base64.b64encode(data).decode("ascii")


class KeyStore:
    """Keys of one provider under ``directory`` (default ``~/.config/mlx-provider``)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = (directory or DEFAULT_KEY_DIR).expanduser()
        self._receipt: Ed25519PrivateKey | None = None

    # Files -----------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.directory / name

    def _load(self, name: str) -> Ed25519PrivateKey | None:
        path = self._path(name)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        if os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}, readable by "
                f"others; run: chmod 600 {path}"
            )
        try:
            seed = base64.b64decode(path.read_text().strip(), validate=True)
            return Ed25519PrivateKey.from_private_bytes(seed)
        except (binascii.Error, ValueError, OSError) as exc:
            raise KeyFileError(
                f"key file {path} is not a base64 Ed25519 seed ({exc}); restore it from a "
                "backup, or remove it to make a new key (a new receipt key is a new identity)"
            ) from None

    def _store(self, name: str, key: Ed25519PrivateKey) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(b64(_seed(key)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _load_or_make(self, name: str) -> Ed25519PrivateKey:
        key = self._load(name)
        if key is None:
            key = Ed25519PrivateKey.generate()
            self._store(name, key)
        return key

    # Receipt key -------------------------------------------------------------

    def receipt_key(self) -> Ed25519PrivateKey:
        """The receipt key, made and stored on first use."""
        if self._receipt is None:
            self._receipt = self._load_or_make(RECEIPT_KEY)
        return self._receipt

    def receipt_public(self) -> bytes:
        return public_key_bytes(self.receipt_key())

    def receipt_key_id(self) -> str:
        return receipt_key_id(self.receipt_public())

    # Admission identity ------------------------------------------------------

    def admission_keys(self) -> tuple[Ed25519PrivateKey, Ed25519PrivateKey]:
        """The current admission key and its next key, made on first use."""
        return self._load_or_make(ADMISSION_KEY), self._load_or_make(ADMISSION_NEXT_KEY)

    def existing_admission_keys(self) -> list[Ed25519PrivateKey]:
        """The admission keys on disk (current first), without making any."""
        return [k for k in (self._load(ADMISSION_KEY), self._load(ADMISSION_NEXT_KEY)) if k]

    def promote_admission_next(self) -> None:
        """The coordinator now knows the next key as current: rotate locally too."""
        current, following = self.admission_keys()
        del current
        self._store(ADMISSION_KEY, following)
        self._store(ADMISSION_NEXT_KEY, Ed25519PrivateKey.generate())

    def signing_key_for(self, public_key: bytes) -> Ed25519PrivateKey | None:
        """The local key whose public key is ``public_key``, if we hold it."""
        candidates = [self.receipt_key(), *self.existing_admission_keys()]
        return next((k for k in candidates if public_key_bytes(k) == public_key), None)
