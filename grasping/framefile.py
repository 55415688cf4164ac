"""Frames on disk: one .npz per frame, for `pickcell plan FRAME.npz` and for sharing test scenes.

Arrays: depth (H, W) float32 metres, rgb (H, W, 3) uint8, K (3, 3), T_base_camera (4, 4); optional
tote_lo / tote_hi (3,) metres (the tote's inner volume, base frame), stamp (), frame_id (0-d str).
Loading never unpickles (allow_pickle=False); any problem raises FrameFileError naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from grasping.types import Bounds, Frame

REQUIRED = ("depth", "rgb", "K", "T_base_camera")


class FrameFileError(ValueError):
    """A frame file is missing, unreadable or malformed."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def save_frame(path: str | Path, frame: Frame, tote: Bounds | None = None) -> Path:
    """Write `frame` (and the tote's bounds, if given) to an .npz file; returns the path written."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "depth": np.asarray(frame.depth, dtype=np.float32),
        "rgb": np.asarray(frame.rgb, dtype=np.uint8),
        "K": np.asarray(frame.K, dtype=np.float64),
        "T_base_camera": np.asarray(frame.T_base_camera, dtype=np.float64),
        "stamp": np.asarray(frame.stamp, dtype=np.float64),
        "frame_id": np.asarray(frame.frame_id, dtype=np.str_),
    }
    if tote is not None:
        arrays["tote_lo"] = np.asarray(tote.lo, dtype=np.float64)
        arrays["tote_hi"] = np.asarray(tote.hi, dtype=np.float64)
    # np.savez appends .npz to names without it; write through a handle so the name is exactly ours.
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def load_frame(path: str | Path) -> tuple[Frame, Bounds | None]:
    """Read a frame file: (Frame, tote Bounds or None when the file has none)."""
    path = Path(path)
    if not path.is_file():
        raise FrameFileError(path, "no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FrameFileError(path, f"not a readable .npz frame file ({exc})") from exc
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise FrameFileError(path, f"missing arrays {missing}; a frame file needs {list(REQUIRED)}")
    depth = data["depth"]
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
        raise FrameFileError(path, f"depth must be a 2-D float array, got {depth.dtype} {depth.shape}")
    rgb = data["rgb"]
    if rgb.shape != (*depth.shape, 3) or rgb.dtype != np.uint8:
        raise FrameFileError(path, f"rgb must be uint8 {(*depth.shape, 3)}, got {rgb.dtype} {rgb.shape}")
    K, T = data["K"], data["T_base_camera"]
    if K.shape != (3, 3) or T.shape != (4, 4) or not (np.isfinite(K).all() and np.isfinite(T).all()):
        raise FrameFileError(
            path, f"K must be finite 3x3 and T_base_camera finite 4x4, got {K.shape}, {T.shape}"
        )
    frame_id = str(data["frame_id"]) if "frame_id" in data else path.stem
    stamp = float(data["stamp"]) if "stamp" in data else 0.0
    frame = Frame(depth=depth, rgb=rgb, K=K, T_base_camera=T, stamp=stamp, frame_id=frame_id)
    tote = None
    if ("tote_lo" in data) != ("tote_hi" in data):
        raise FrameFileError(path, "tote_lo and tote_hi must both be present or both absent")
    if "tote_lo" in data:
        try:
            tote = Bounds(data["tote_lo"], data["tote_hi"])
        except ValueError as exc:
            raise FrameFileError(path, f"bad tote bounds: {exc}") from exc
    return frame, tote
