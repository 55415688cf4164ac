"""CURVE key pairs, their roles, and the broker's allowlist.

Layout on disk (zmq.auth certificate files, z85 text):
    NAME.key          public key (safe to copy into a broker's allowed/ROLE/ folder)
    NAME.key_secret   public + secret key (keep on the machine that owns it)

Every client key has a role: `cell` (submits requests), `associate` (a person who answers) or `console`
(a web console that answers on behalf of the people logged into it). `pickcell keys new NAME --role ROLE`
writes the role into both files' metadata; the broker, though, trusts only where the public key sits:

    KEYS/broker.key_secret, KEYS/broker.key     the broker's own pair
    KEYS/allowed/cell/NAME.key                   admitted as a cell named NAME
    KEYS/allowed/associate/NAME.key              admitted as an associate named NAME
    KEYS/allowed/console/NAME.key                admitted as a console named NAME

A key anywhere else under allowed/ (e.g. allowed/NAME.key, the layout before roles) has no role and is
refused, as is a key whose metadata names another role than its folder, and a name or key that appears
twice. The file name (NAME) is the authenticated identity the broker records with every request and answer.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BROKER_KEY_NAME = "broker"
ALLOWED_DIR = "allowed"
ROLES = ("cell", "associate", "console")


class KeyFileError(Exception):
    """A key file is missing or unreadable; the message says which and what to do."""


@dataclass(frozen=True)
class ClientKeys:
    """A client's own CURVE key pair (z85-encoded bytes, as zmq socket options take them)."""

    public: bytes
    secret: bytes
    name: str = ""  # file stem; the broker knows us by the name of our public key in its allowlist
    role: str | None = None  # from the file's metadata (informational: the broker trusts its own folders)

    @classmethod
    def from_file(cls, path: str | Path) -> ClientKeys:
        """Load NAME.key_secret (a path to NAME.key is accepted: its sibling .key_secret is used)."""
        p = Path(path)
        if p.suffix == ".key":
            p = p.with_suffix(".key_secret")
        public, secret = _load(p, need_secret=True)
        return cls(public=public, secret=secret, name=p.name.removesuffix(".key_secret"), role=key_role(p))


def _check_name(name: str) -> None:
    if (
        not name
        or "/" in name
        or "\\" in name
        or name.startswith(".")
        or name != name.strip()
        or len(name) > 128
    ):
        raise KeyFileError(f"invalid key name {name!r}: use a plain file name such as 'cell-1' or 'alice'")


def new_keypair(name: str, directory: str | Path, role: str | None = None) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into `directory`; refuses to overwrite an existing pair.

    `role` (cell | associate | console) is written into both files' metadata; only the broker's own key
    has none.
    """
    import zmq

    _check_name(name)
    if role is not None and role not in ROLES:
        raise KeyFileError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise KeyFileError(
                f"{p} exists already; refusing to overwrite a key (delete it first if you mean it)"
            )
    pub, sec = zmq.curve_keypair()
    meta = {"role": role} if role else {}
    _write(public, pub, None, meta)
    # The secret key is for its owner's eyes only: create it 0600 rather than chmod afterwards.
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    _write(secret, pub, sec, meta)
    return public, secret


def _write(path: Path, public: bytes, secret: bytes | None, metadata: dict[str, str]) -> None:
    kind = "secret" if secret else "public"
    lines = [
        f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by pickcell  ****",
        f"#   ZeroMQ CURVE {'**Secret** ' if secret else ''}Certificate ({kind} key)",
        "#   " + ("DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if secret else
                  "Copy it into a broker's allowed/ROLE/ folder to admit its owner."),
        "",
        "metadata",
        *(f"    {k} = \"{v}\"" for k, v in metadata.items()),
        "curve",
        f"    public-key = \"{public.decode('ascii')}\"",
    ]  # fmt: skip
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def key_role(path: str | Path) -> str | None:
    """The role written in a key file's metadata, or None (the broker's own key; keys made before roles)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    in_meta = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw.startswith((" ", "\t")):
            in_meta = line == "metadata"
            continue
        if in_meta and "=" in line:
            k, v = line.split("=", 1)
            if k.strip() == "role":
                return v.strip().strip("'\"") or None
    return None


def load_public(path: str | Path) -> bytes:
    """The z85 public key from NAME.key (or NAME.key_secret)."""
    return _load(Path(path), need_secret=False)[0]


@dataclass(frozen=True)
class AllowedKey:
    name: str  # authenticated identity (file stem)
    role: str  # cell | associate | console
    path: Path


@dataclass(frozen=True)
class Allowlist:
    """What the allowlist folder admits, and what it holds but refuses (with the reason, for the log)."""

    keys: dict[bytes, AllowedKey] = field(default_factory=dict)  # z85 public key -> who
    refused: dict[bytes, str] = field(default_factory=dict)  # z85 public key -> why it is not admitted

    def role_of(self, name: str) -> str | None:
        for k in self.keys.values():
            if k.name == name:
                return k.role
        return None

    @property
    def roles(self) -> dict[str, str]:
        """{name: role} of every admitted key."""
        return {k.name: k.role for k in self.keys.values()}


def load_allowlist(directory: str | Path) -> dict[bytes, str]:
    """{z85 public key: name} for every *.key file directly in a flat folder (no roles).

    For services whose clients all play one part (the fleet service: every key is a cell); the assist
    broker, whose keys have roles, reads its folders with `load_role_allowlist`."""
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


def load_role_allowlist(directory: str | Path) -> Allowlist:
    """Read allowed/ROLE/*.key. Keys without a role, with a role that disagrees with their folder, or whose
    name or key appears twice are not admitted: they land in `refused` with the reason (and a log line)."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(
            f"allowlist folder {d} does not exist; create it and admit clients with "
            f"`pickcell keys allow NAME.key --keys KEYS` (it copies the key into allowed/ROLE/)"
        )
    found: list[tuple[bytes, str, str | None, Path, str | None]] = []  # key, name, role, path, problem
    for p in sorted(d.rglob("*.key")):
        rel = p.relative_to(d)
        folder_role = rel.parts[0] if len(rel.parts) == 2 else None
        try:
            public = load_public(p)
        except KeyFileError as exc:
            log.error("allowlist: skipping %s: %s", p, exc)
            continue
        problem = None
        if folder_role not in ROLES:
            problem = (
                f"key {p.stem!r} ({p}) has no role: move it into {d}/cell/, {d}/associate/ or {d}/console/"
            )
            folder_role = None
        else:
            meta = key_role(p)
            if meta is not None and meta != folder_role:
                problem = (
                    f"key {p.stem!r} ({p}) was made for role {meta!r} but sits in the {folder_role!r} folder"
                )
        found.append((public, p.stem, folder_role, p, problem))
    names: dict[str, int] = {}
    publics: dict[bytes, int] = {}
    for public, name, _, _, problem in found:
        if problem is None:  # a key refused anyway (no role) does not make a good one ambiguous
            names[name] = names.get(name, 0) + 1
            publics[public] = publics.get(public, 0) + 1
    out = Allowlist()
    for public, name, role, p, problem in found:
        if problem is None and names[name] > 1:
            problem = f"key name {name!r} appears {names[name]} times under {d}: a name must be one identity"
        if problem is None and publics[public] > 1:
            problem = f"the public key of {name!r} ({p}) appears {publics[public]} times under {d}"
        if problem is None:
            out.keys[public] = AllowedKey(name, role, p)
        else:
            out.refused[public] = problem
    for why in sorted(set(out.refused.values())):
        log.warning("allowlist: NOT admitting: %s", why)
    return out


def allow(public_key_path: str | Path, keys_dir: str | Path, role: str | None = None) -> Path:
    """Admit a client: copy its NAME.key into KEYS/allowed/ROLE/ (role from the key's metadata unless given).

    Written to a temporary name and renamed, so the broker never reads half a file.
    """
    src = Path(public_key_path)
    if src.suffix == ".key_secret":
        src = src.with_suffix(".key")  # never copy a secret key anywhere
    public = load_public(src)
    name = src.stem
    _check_name(name)
    meta = key_role(src)
    role = role or meta
    if role not in ROLES:
        raise KeyFileError(
            f"{src} carries no role; say which with --role ({', '.join(ROLES)}) or make the key with "
            "`pickcell keys new NAME --role ROLE`"
        )
    if meta is not None and meta != role:
        raise KeyFileError(f"{src} was made for role {meta!r}, not {role!r}")
    allowed = Path(keys_dir) / ALLOWED_DIR
    for other in ROLES:
        if other != role and (allowed / other / f"{name}.key").exists():
            raise KeyFileError(
                f"{name!r} is already admitted as {other!r}; revoke it first (one name, one role)"
            )
    dest_dir = allowed / role
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}.key"
    tmp = dest_dir / f".{name}.key.tmp"
    public_text = src.read_text(encoding="utf-8")
    if load_public(src) != public:  # pragma: no cover - the file changed under us
        raise KeyFileError(f"{src} changed while reading it")
    tmp.write_text(public_text, encoding="utf-8")
    os.replace(tmp, dest)
    return dest


def revoke(name: str, keys_dir: str | Path) -> list[Path]:
    """Remove NAME's public key from every folder under KEYS/allowed/; returns what was removed.

    A running broker notices within one heartbeat and closes that key's open connections.
    """
    _check_name(name)
    allowed = Path(keys_dir) / ALLOWED_DIR
    removed = []
    for p in sorted(allowed.rglob(f"{name}.key")) if allowed.is_dir() else []:
        p.unlink()
        removed.append(p)
    return removed


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise KeyFileError(
            f"key file {path} not found (make one with: pickcell keys new NAME --role ROLE --dir DIR)"
        )
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except Exception as exc:  # zmq raises ValueError/OSError/IndexError for bad files
        raise KeyFileError(f"key file {path} is not a zmq certificate: {exc}") from None
    if need_secret and not secret:
        raise KeyFileError(f"{path} holds no secret key (use NAME.key_secret, not NAME.key)")
    return public, secret
