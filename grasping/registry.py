"""The model registry: which model files exist, which passed the gate, which one is current.

Layout of a registry directory:
    index.json                       the index (written atomically: tmp file, fsync, rename)
    models/<version>.safetensors     copies of added model files (+ .sha256 sidecar, + .md card)
    gates/<version>.json             the gate report that allowed promotion, when there is one
Every entry records the file's sha256; `verify()` re-hashes and re-loads every file, and `current()`
hands out a path only after its hash matches the index. Index updates hold an exclusive `flock` on
`<dir>/.lock`, so two processes (a training job and an operator) cannot lose each other's writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grasping.modelfile import ModelFileError, file_sha256, load_model, sidecar_path

INDEX_VERSION = 1


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says which version/file and why."""


@dataclass(frozen=True)
class RegistryEntry:
    version: str
    sha256: str
    file: str  # path relative to the registry directory
    added: str  # UTC time it was added
    source: str  # path it was added from
    metrics: dict[str, Any]  # the test metrics recorded in the model file
    gate_passed: bool | None = None  # None: never gated
    gate_report: str | None = None  # relative path of the gate report JSON
    card: str | None = None  # relative path of the model card


@dataclass(frozen=True)
class VerifyProblem:
    version: str
    problem: str


class ModelRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.index_path = self.root / "index.json"

    # --- index I/O ----------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"index_version": INDEX_VERSION, "current": None, "models": {}, "history": []}
        try:
            index = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as exc:
            raise RegistryError(f"registry index {self.index_path} is corrupt ({exc})") from None
        if index.get("index_version") != INDEX_VERSION:
            raise RegistryError(
                f"registry index {self.index_path} has version {index.get('index_version')}, "
                f"this pickcell reads {INDEX_VERSION}"
            )
        return index

    def _write(self, index: dict[str, Any]) -> None:
        tmp = self.index_path.with_name(f".index.json.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.index_path)
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    # --- operations ---------------------------------------------------------------------------------

    def add(self, path: str | Path, gate_report: Any | None = None) -> RegistryEntry:
        """Verify a model file and copy it (with sidecar and card) into the registry.

        Adding the same version with the same sha256 again is a no-op (returns the entry); the same
        version with different contents is refused. `gate_report` (a learning.GateReport) is stored.
        """
        src = Path(path)
        loaded = load_model(src)  # raises ModelFileError naming the file
        version = loaded.version
        if any(c in version for c in "/\\") or version.startswith("."):
            raise RegistryError(f"model version {version!r} in {src} is not usable as a file name")
        with self._locked():
            index = self._read()
            old = index["models"].get(version)
            if old is not None:
                if old["sha256"] != loaded.sha256:
                    raise RegistryError(
                        f"version {version} is already registered with sha256 {old['sha256'][:16]}...; "
                        f"{src} has {loaded.sha256[:16]}... (give the new model its own version)"
                    )
                entry = RegistryEntry(**old)
            else:
                models_dir = self.root / "models"
                models_dir.mkdir(parents=True, exist_ok=True)
                dst = models_dir / f"{version}.safetensors"
                tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
                shutil.copyfile(src, tmp)
                if file_sha256(tmp) != loaded.sha256:  # the source changed under us
                    tmp.unlink()
                    raise RegistryError(f"{src} changed while it was being copied; try again")
                os.replace(tmp, dst)
                sidecar_path(dst).write_text(f"{loaded.sha256}  {dst.name}\n")
                card_src = src.with_suffix(".md")
                card = None
                if card_src.exists():
                    shutil.copyfile(card_src, dst.with_suffix(".md"))
                    card = str(dst.with_suffix(".md").relative_to(self.root))
                entry = RegistryEntry(
                    version=version,
                    sha256=loaded.sha256,
                    file=str(dst.relative_to(self.root)),
                    added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    source=str(src.resolve()),
                    metrics=loaded.meta.get("metrics", {}),
                    card=card,
                )
            if gate_report is not None:
                entry = self._store_gate(entry, gate_report)
            index["models"][version] = asdict(entry)
            self._write(index)
        return entry

    def _store_gate(self, entry: RegistryEntry, report: Any) -> RegistryEntry:
        if report.candidate_sha256 != entry.sha256:
            raise RegistryError(
                f"gate report is for sha256 {report.candidate_sha256[:16]}..., "
                f"not version {entry.version} ({entry.sha256[:16]}...)"
            )
        gates = self.root / "gates"
        gates.mkdir(parents=True, exist_ok=True)
        out = gates / f"{entry.version}.json"
        out.write_text(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return RegistryEntry(
            **{
                **asdict(entry),
                "gate_passed": bool(report.passed),
                "gate_report": str(out.relative_to(self.root)),
            }
        )

    def record_gate(self, version: str, report: Any) -> RegistryEntry:
        """Attach a gate report to a registered version."""
        with self._locked():
            index = self._read()
            if version not in index["models"]:
                raise RegistryError(f"version {version!r} is not in the registry {self.root}")
            entry = self._store_gate(RegistryEntry(**index["models"][version]), report)
            index["models"][version] = asdict(entry)
            self._write(index)
        return entry

    def list(self) -> list[RegistryEntry]:
        return sorted((RegistryEntry(**m) for m in self._read()["models"].values()), key=lambda e: e.added)

    def get(self, version: str) -> RegistryEntry:
        models = self._read()["models"]
        if version not in models:
            raise RegistryError(f"version {version!r} is not in the registry {self.root}")
        return RegistryEntry(**models[version])

    def current_version(self) -> str | None:
        return self._read()["current"]

    def promote(self, version: str, force: bool = False, reason: str = "") -> RegistryEntry:
        """Make `version` current. Only a gate-passed version, unless `force` (recorded in history)."""
        with self._locked():
            index = self._read()
            if version not in index["models"]:
                raise RegistryError(f"version {version!r} is not in the registry {self.root}")
            entry = RegistryEntry(**index["models"][version])
            if entry.gate_passed is not True and not force:
                state = "has not been gated" if entry.gate_passed is None else "failed the gate"
                raise RegistryError(f"version {version} {state}; promote with force to override")
            got = file_sha256(self.root / entry.file)
            if got != entry.sha256:
                raise RegistryError(
                    f"model file {self.root / entry.file} sha256 {got[:16]}... "
                    f"!= index {entry.sha256[:16]}..."
                )
            index["history"].append(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "from": index["current"],
                    "to": version,
                    "sha256": entry.sha256,
                    "forced": bool(force and entry.gate_passed is not True),
                    "reason": reason,
                }
            )
            index["current"] = version
            self._write(index)
        return entry

    def history(self) -> list[dict[str, Any]]:
        return list(self._read()["history"])

    def current(self) -> Path | None:
        """Path of the current model after checking its sha256 against the index; None if none."""
        index = self._read()
        version = index["current"]
        if version is None:
            return None
        entry = RegistryEntry(**index["models"][version])
        path = self.root / entry.file
        try:
            got = file_sha256(path)
        except FileNotFoundError:
            raise ModelFileError(path, f"current model {version} is missing from the registry") from None
        if got != entry.sha256:
            raise ModelFileError(path, f"sha256 {got[:16]}... does not match the registry index")
        return path

    def verify(self) -> list[VerifyProblem]:
        """Re-hash and re-load every registered file. Returns the problems (empty = all good)."""
        problems: list[VerifyProblem] = []
        index = self._read()
        for version, m in sorted(index["models"].items()):
            try:
                loaded = load_model(self.root / m["file"], expected_sha256=m["sha256"])
                if loaded.version != version:
                    problems.append(VerifyProblem(version, f"file holds version {loaded.version}"))
            except ModelFileError as exc:
                problems.append(VerifyProblem(version, str(exc)))
        if index["current"] is not None and index["current"] not in index["models"]:
            problems.append(VerifyProblem(index["current"], "current version has no entry"))
        return problems
