"""CURVE key pairs and the broker's allowlist.

Layout on disk (zmq.auth certificate files, z85 text):
    NAME.key          public key (safe to copy into a broker's allowed/ folder)
    NAME.key_secret   public + secret key (keep on the machine that owns it)

A broker's keys folder holds `broker.key_secret` (and `broker.key`, which clients need) plus an
`allowed/` folder with the public keys of every cell and associate it admits. The file name (NAME) is
the authenticated identity: the broker stores it with every answer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BROKER_KEY_NAME = "broker"
ALLOWED_DIR = "allowed"


class KeyFileError(Exception):
    """A key file is missing or unreadable; the message says which and what to do."""


@dataclass(frozen=True)
class ClientKeys:
    """A client's own CURVE key pair (z85-encoded bytes, as zmq socket options take them)."""

    public: bytes
    secret: bytes
    name: str = ""  # file stem; the broker knows us by the name of our public key in its allowlist

    @classmethod
    def from_file(cls, path: str | Path) -> ClientKeys:
        """Load NAME.key_secret (a path to NAME.key is accepted: its sibling .key_secret is used)."""
        p = Path(path)
        if p.suffix == ".key":
            p = p.with_suffix(".key_secret")
        public, secret = _load(p, need_secret=True)
        return cls(public=public, secret=secret, name=p.name.removesuffix(".key_secret"))


def new_keypair(name: str, directory: str | Path) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into `directory`; refuses to overwrite an existing pair."""
    import zmq.auth

    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise KeyFileError(f"invalid key name {name!r}: use a plain file name such as 'cell-1' or 'alice'")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise KeyFileError(
                f"{p} exists already; refusing to overwrite a key (delete it first if you mean it)"
            )
    public_s, secret_s = zmq.auth.create_certificates(str(d), name)
    os.chmod(secret_s, 0o600)  # the secret key is for its owner's eyes only
    return Path(public_s), Path(secret_s)


def load_public(path: str | Path) -> bytes:
    """The z85 public key from NAME.key (or NAME.key_secret)."""
    return _load(Path(path), need_secret=False)[0]


def load_allowlist(directory: str | Path) -> dict[bytes, str]:
    """{z85 public key: name} for every *.key file in the folder; unreadable files are logged and skipped."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(
            f"allowlist folder {d} does not exist; create it and copy clients' NAME.key files in"
        )
    out: dict[bytes, str] = {}
    for p in sorted(d.glob("*.key")):
        try:
            out[load_public(p)] = p.stem
        except KeyFileError as exc:
            log.error("allowlist: skipping %s: %s", p, exc)
    return out


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise KeyFileError(f"key file {path} not found (make one with: pickcell keys new NAME --dir DIR)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except Exception as exc:  # zmq raises ValueError/OSError/IndexError for bad files
        raise KeyFileError(f"key file {path} is not a zmq certificate: {exc}") from None
    if need_secret and not secret:
        raise KeyFileError(f"{path} holds no secret key (use NAME.key_secret, not NAME.key)")
    return public, secret
