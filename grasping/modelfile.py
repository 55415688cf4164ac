"""The model file: one safetensors file holding everything a cell needs to score grasps.

Tensors: the network's weights (`net.*`), the per-gripper calibrators (`calib.<g>.*`), the
conformal thresholds (`conformal.thresholds`, one per gripper), the watchdog statistics
(`watchdog.*`) and, optionally, the item-level watchdog (`item_watchdog.*`: feature centre and
scale, the bank of standardised training-item descriptors and their neighbour radii, and [scene
mu, sd, threshold, quantile, k, descriptor version, scene quantile]; optionally
`item_watchdog.item` = [per-item threshold, its quantile], which gives each item its own verdict).
A file without `item_watchdog.*` (written before it existed) still loads: `LoadedModel.item_watchdog`
is None and the planner uses the embedding watchdog alone; one without `item_watchdog.item` judges
whole scenes only.
The safetensors header metadata (string -> string) carries
`pickcell.format` / `pickcell.format_version` and `pickcell.meta`, a JSON object with the model
version string, architecture arguments, feature names, training-data summary, metrics, alpha,
thresholds and creation time.

The sha256 of the whole file is written beside it as `<file>.sha256` (sha256sum format) and is
recorded by the registry. Loading reads the bytes once, hashes exactly those bytes, and parses them
with safetensors, which stores raw little-endian arrays: nothing is ever unpickled, so a model file
cannot run code. Anything wrong (missing, truncated, corrupt, a pickle, another format version, a
hash mismatch, weights that do not fit the architecture) raises `ModelFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grasping.calibration import ISOTONIC, METHOD_CODES, TEMPERATURE, Calibrator
from grasping.watchdog import ITEM_DESCRIPTOR_VERSION, ITEM_FEATURE_COUNT, ItemWatchdog, Watchdog

log = logging.getLogger(__name__)

FORMAT = "pickcell-grasp-model"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header, bytes
_CODE_METHODS = {v: k for k, v in METHOD_CODES.items()}


class ModelFileError(Exception):
    """A model file that cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"model file {self.path}: {problem}")


@dataclass(frozen=True)
class LoadedModel:
    """A verified model file, parsed. `net` is a GraspNet in eval mode."""

    path: Path
    sha256: str
    meta: dict[str, Any]  # the JSON metadata (see module docstring)
    net: Any  # grasping.model.GraspNet (typed Any so importing this module does not import torch)
    calibrators: tuple[Calibrator, ...]  # one per gripper (index = scoring.SUCTION / PARALLEL_JAW)
    thresholds: np.ndarray  # (2,) calibrated p needed to auto-execute, per gripper (inf = never)
    watchdog: Watchdog
    extra: dict[str, Any] = field(default_factory=dict)
    item_watchdog: ItemWatchdog | None = None  # item-level watchdog; None in files written before it

    @property
    def version(self) -> str:
        return str(self.meta["model_version"])


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".sha256")


def read_sidecar(path: str | Path) -> str | None:
    """The sha256 recorded beside a model file, or None if there is no sidecar."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    text = side.read_text().strip().split()
    if not text or len(text[0]) != 64 or any(c not in "0123456789abcdef" for c in text[0].lower()):
        raise ModelFileError(path, f"sidecar {side.name} does not hold a sha256 hex digest")
    return text[0].lower()


def _calibrator_tensors(g: int, cal: Calibrator) -> dict[str, np.ndarray]:
    x = cal.iso_x if cal.method == ISOTONIC else np.zeros(1)
    y = cal.iso_y if cal.method == ISOTONIC else np.zeros(1)
    return {
        f"calib.{g}.method": np.array([METHOD_CODES[cal.method]], dtype=np.int64),
        f"calib.{g}.temperature": np.array([cal.temperature], dtype=np.float64),
        f"calib.{g}.bias": np.array([cal.bias], dtype=np.float64),
        # Copies: one calibrator may serve both grippers (pooled), and tensors that share memory
        # cannot be written (safetensors refuses them).
        f"calib.{g}.iso_x": np.array(x, dtype=np.float64),
        f"calib.{g}.iso_y": np.array(y, dtype=np.float64),
    }


def _json_safe(obj: Any) -> Any:
    """JSON without NaN/inf (they are not JSON): write them as strings."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def save_model(
    path: str | Path,
    net: Any,
    calibrators: tuple[Calibrator, ...] | list[Calibrator],
    thresholds: np.ndarray,
    watchdog: Watchdog,
    meta: dict[str, Any],
    item_watchdog: ItemWatchdog | None = None,
) -> str:
    """Write a model file atomically (tmp + rename) and its `.sha256` sidecar. Returns the sha256.

    `meta` must hold at least `model_version`; architecture args, format and creation time are added.
    `item_watchdog` is optional (a freshly trained model has none until it is fitted on live scenes).
    """
    import torch
    from safetensors.torch import save

    if "model_version" not in meta or not str(meta["model_version"]).strip():
        raise ValueError("meta['model_version'] is required")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (len(calibrators),):
        raise ValueError(f"need one threshold per calibrator, got {thresholds.shape}")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"net.{k}"] = v.detach().cpu().contiguous()
    arrays: dict[str, np.ndarray] = {"conformal.thresholds": thresholds}
    for g, cal in enumerate(calibrators):
        arrays.update(_calibrator_tensors(g, cal))
    arrays.update(
        {
            "watchdog.mean": watchdog.mean,
            "watchdog.precision": watchdog.precision,
            # order read back by load_model: mu, sd, threshold, quantile, shrinkage
            "watchdog.scene": np.array(
                [
                    watchdog.scene_mu,
                    watchdog.scene_sd,
                    watchdog.threshold_sigma,
                    watchdog.quantile,
                    watchdog.shrinkage,
                ]
            ),
        }
    )
    if item_watchdog is not None:
        iw = item_watchdog
        arrays.update(
            {
                "item_watchdog.center": iw.center,
                "item_watchdog.scale": iw.scale,
                "item_watchdog.bank": iw.bank,
                "item_watchdog.radius": iw.radius,
                # order read back by load_model: mu, sd, threshold, quantile, k, descriptor version,
                # scene quantile
                "item_watchdog.scene": np.array(
                    [
                        iw.scene_mu,
                        iw.scene_sd,
                        iw.threshold_sigma,
                        iw.quantile,
                        iw.k,
                        iw.version,
                        iw.scene_quantile,
                    ],
                    dtype=np.float64,
                ),
            }
        )
        if iw.item_threshold is not None:
            arrays["item_watchdog.item"] = np.array([iw.item_threshold, iw.item_quantile], dtype=np.float64)
    for k, v in arrays.items():
        tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
    full_meta = dict(meta)
    full_meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    full_meta["arch"] = net.arch_args()
    full_meta["thresholds"] = thresholds.tolist()
    header = {
        "pickcell.format": FORMAT,
        "pickcell.format_version": str(FORMAT_VERSION),
        "pickcell.meta": json.dumps(_json_safe(full_meta), sort_keys=True),
    }
    data = save(tensors, metadata=header)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    digest = hashlib.sha256(data).hexdigest()
    side_tmp = out.with_name(f".{out.name}.sha256.tmp{os.getpid()}")
    side_tmp.write_text(f"{digest}  {out.name}\n")
    os.replace(side_tmp, sidecar_path(out))
    return digest


def _looks_like_pickle(data: bytes) -> bool:
    """A raw pickle (PROTO opcode 0x80 + protocol 2..5) or a torch.save zip archive."""
    return (len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5) or data[:4] == b"PK\x03\x04"


def _parse_header(path: Path, data: bytes) -> dict[str, Any]:
    """Check the safetensors framing ourselves so every failure gets a precise message.

    The first 8 bytes are the header length, so a valid file may well start with 0x80 or "PK":
    a file is called a pickle only when its safetensors framing does not hold.
    """
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    framed = 0 < n <= _MAX_HEADER and 8 + n <= len(data) and data[8:9] == b"{"
    if not framed and _looks_like_pickle(data):
        raise ModelFileError(
            path, "is a pickle / torch.save archive, not safetensors; pickcell never unpickles model files"
        )
    if len(data) < 8:
        raise ModelFileError(path, f"truncated: {len(data)} bytes, too short for a safetensors header")
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ModelFileError(path, f"truncated or corrupt: header claims {n} bytes, file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "corrupt safetensors header (not a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelFileError(path, "corrupt safetensors header (bad tensor entries)") from None
    if 8 + n + end != len(data):
        raise ModelFileError(
            path, f"truncated or corrupt: tensors need {8 + n + end} bytes, file has {len(data)}"
        )
    return header


def load_model(path: str | Path, expected_sha256: str | None = None) -> LoadedModel:
    """Read, verify and parse a model file. Raises ModelFileError naming the file on any problem.

    The hash checked is `expected_sha256` if given, else the `<file>.sha256` sidecar if present.
    """
    import torch
    from safetensors.torch import load

    from grasping.model import GraspNet

    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(p, "does not exist") from None
    except OSError as exc:
        raise ModelFileError(p, f"cannot be read ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    want = expected_sha256.lower() if expected_sha256 else read_sidecar(p)
    if want is not None and want != digest:
        src = "expected" if expected_sha256 else f"recorded in {sidecar_path(p).name}"
        raise ModelFileError(p, f"sha256 mismatch: file is {digest[:16]}..., {src} {want[:16]}...")
    header = _parse_header(p, data)
    md = header.get("__metadata__") or {}
    fmt = md.get("pickcell.format")
    if fmt != FORMAT:
        raise ModelFileError(p, f"not a pickcell grasp model (format {fmt!r}, expected {FORMAT!r})")
    version = md.get("pickcell.format_version")
    if version != str(FORMAT_VERSION):
        raise ModelFileError(
            p, f"format version {version} is not supported (this pickcell reads version {FORMAT_VERSION})"
        )
    try:
        meta = json.loads(md["pickcell.meta"])
        arch = meta["arch"]
        str(meta["model_version"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ModelFileError(p, f"metadata incomplete or corrupt ({exc!r})") from None
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for bad framing
        raise ModelFileError(p, f"corrupt tensors ({exc})") from None
    try:
        net = GraspNet(
            **{k: int(arch[k]) for k in ("in_channels", "patch_size", "n_features", "embed_dim")},
            channels=tuple(int(c) for c in arch["channels"]),
        )
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        net.load_state_dict(state, strict=True)
        net.eval()
        for t in net.state_dict().values():
            if not torch.isfinite(t).all():
                raise ValueError("weights contain NaN or inf")
        n_g = 2
        cals = []
        for g in range(n_g):
            method = _CODE_METHODS[int(tensors[f"calib.{g}.method"][0])]
            if method == TEMPERATURE:
                cals.append(
                    Calibrator(
                        TEMPERATURE,
                        temperature=float(tensors[f"calib.{g}.temperature"][0]),
                        bias=float(tensors[f"calib.{g}.bias"][0]),
                    )
                )
            else:
                cals.append(
                    Calibrator(
                        ISOTONIC,
                        iso_x=tensors[f"calib.{g}.iso_x"].numpy(),
                        iso_y=tensors[f"calib.{g}.iso_y"].numpy(),
                    )
                )
        thresholds = tensors["conformal.thresholds"].numpy().astype(np.float64)
        if thresholds.shape != (n_g,) or np.isnan(thresholds).any():
            raise ValueError(f"conformal thresholds malformed: {thresholds}")
        sc = tensors["watchdog.scene"].numpy()
        wd = Watchdog(
            mean=tensors["watchdog.mean"].numpy(),
            precision=tensors["watchdog.precision"].numpy(),
            scene_mu=float(sc[0]),
            scene_sd=float(sc[1]),
            threshold_sigma=float(sc[2]),
            quantile=float(sc[3]),
            shrinkage=float(sc[4]),
        )
        if wd.dim != net.embed_dim:
            raise ValueError(f"watchdog dimension {wd.dim} != embedding dimension {net.embed_dim}")
        item_wd = _load_item_watchdog(p, tensors)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise ModelFileError(p, f"contents do not match format version {FORMAT_VERSION} ({exc})") from None
    return LoadedModel(p, digest, meta, net, tuple(cals), thresholds, wd, item_watchdog=item_wd)


def _load_item_watchdog(path: Path, tensors: dict[str, Any]) -> ItemWatchdog | None:
    """The item watchdog of a file, or None (with a log line) when the file has none or an older one.

    Malformed item-watchdog tensors raise (ValueError/KeyError, turned into ModelFileError by the
    caller): a file that claims an item watchdog and holds a broken one is corrupt, not old.
    """
    keys = tuple(f"item_watchdog.{k}" for k in ("center", "scale", "bank", "radius", "scene"))
    present = [k in tensors for k in keys]
    if not any(present):
        log.info("model file %s has no item watchdog; scene OOD uses the embedding watchdog alone", path)
        return None
    if not all(present):
        missing = [k for k in keys if k not in tensors]
        raise KeyError(f"item watchdog incomplete: missing {missing}")
    sc = tensors["item_watchdog.scene"].numpy()
    if sc.shape != (7,):
        raise ValueError(f"item_watchdog.scene must hold 7 values, got shape {sc.shape}")
    if int(sc[5]) not in ITEM_FEATURE_COUNT:
        log.warning(
            "model file %s: item watchdog fitted on item descriptor version %d, this pickcell reads "
            "versions up to %d; ignoring it (scene OOD uses the embedding watchdog alone)",
            path,
            int(sc[5]),
            ITEM_DESCRIPTOR_VERSION,
        )
        return None
    return ItemWatchdog(
        center=tensors["item_watchdog.center"].numpy(),
        scale=tensors["item_watchdog.scale"].numpy(),
        bank=tensors["item_watchdog.bank"].numpy(),
        radius=tensors["item_watchdog.radius"].numpy(),
        k=int(sc[4]),
        scene_quantile=float(sc[6]),
        scene_mu=float(sc[0]),
        scene_sd=float(sc[1]),
        threshold_sigma=float(sc[2]),
        quantile=float(sc[3]),
        version=int(sc[5]),
        **_item_threshold(tensors),
    )


def _item_threshold(tensors: dict[str, Any]) -> dict[str, float]:
    """The per-item threshold fields of the item watchdog, where the file has them."""
    if "item_watchdog.item" not in tensors:
        return {}
    it = tensors["item_watchdog.item"].numpy()
    if it.shape != (2,):
        raise ValueError(f"item_watchdog.item must hold 2 values, got shape {it.shape}")
    return {"item_threshold": float(it[0]), "item_quantile": float(it[1])}
