"""The fleet's ed25519 signing key: the fleet service signs every model it publishes; cells hold the
public key and load nothing whose signature does not verify.

What is signed is a short canonical statement, not the file: `pickcell-model-signature-v1`, the
version, the file's sha256 and its size, one per line. The cell hashes the bytes it received, so a
valid signature over (version, sha256, size) binds those exact bytes to that version.

Files: `signing.ed25519` (PKCS#8 PEM private key, mode 0600, stays with the fleet service) and
`signing.pub` (the 32-byte raw public key as hex, one line; copy it to every cell).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_NAME = "signing.ed25519"
PUBLIC_NAME = "signing.pub"
STATEMENT_TAG = "pickcell-model-signature-v1"


class SignatureError(Exception):
    """A signature or signing key that cannot be used; the message says which and why."""


def statement(version: str, sha256: str, size: int) -> bytes:
    """The bytes that are signed for one model file."""
    if "\n" in version:
        raise SignatureError(f"model version {version!r} contains a newline")
    return f"{STATEMENT_TAG}\n{version}\n{sha256.lower()}\n{int(size)}\n".encode()


def new_signing_key(directory: str | Path) -> tuple[Path, Path]:
    """Write a new key pair into `directory`; refuses to overwrite an existing private key."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / PRIVATE_NAME, d / PUBLIC_NAME
    if priv_path.exists():
        raise SignatureError(f"{priv_path} exists already; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_text(public_hex(key.public_key()) + "\n")
    return priv_path, pub_path


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_private(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(f"signing key {p} not found (make one with: pickcell fleet init)") from None
    except ValueError as exc:
        raise SignatureError(f"signing key {p} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {p} is not an ed25519 key")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    p = Path(path)
    try:
        text = p.read_text().strip()
    except FileNotFoundError:
        raise SignatureError(f"fleet public key {p} not found (copy signing.pub from the fleet)") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise SignatureError(f"fleet public key {p} is not hex") from None
    if len(raw) != 32:
        raise SignatureError(f"fleet public key {p} holds {len(raw)} bytes, an ed25519 key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, version: str, sha256: str, size: int) -> bytes:
    return key.sign(statement(version, sha256, size))


def verify(key: Ed25519PublicKey, signature: bytes, version: str, sha256: str, size: int) -> bool:
    """True iff `signature` is the fleet's signature over (version, sha256, size)."""
    try:
        key.verify(bytes(signature), statement(version, sha256, size))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
