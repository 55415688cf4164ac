"""Turn a pixel an associate clicked into an executable suction grasp.

A person answering an assist request can click "a better spot" on the image. We back-project a small
window of depth pixels around the click, fit a plane to those points, and approach along the plane's
normal (pointing into the surface). If the window has too few valid depth pixels, or the surface is
too curved for the cup, there is no grasp to build and the caller gets a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grasping.types import Frame, Grasp, grasp_frame, matrix_to_quat


class PixelGraspError(ValueError):
    """The clicked pixel cannot be turned into a grasp (no depth there, or no usable surface)."""


@dataclass(frozen=True)
class PixelGraspConfig:
    window_px: int = 7  # half-size of the square window around the click, pixels
    min_valid: int = 20  # minimum number of valid depth pixels in the window
    max_residual_m: float = 0.004  # max RMS distance of window points from the fitted plane, metres
    max_tilt_deg: float = 60.0  # reject approaches further than this from straight down, degrees


def grasp_from_pixel(frame: Frame, u: int, v: int, config: PixelGraspConfig | None = None) -> Grasp:
    """A suction grasp at image pixel (u, v) = (column, row), approaching along the local surface normal."""
    cfg = config or PixelGraspConfig()
    h, w = frame.shape
    if not (0 <= u < w and 0 <= v < h):
        raise PixelGraspError(f"pixel ({u}, {v}) is outside the {w}x{h} image")
    r = cfg.window_px
    v0, v1, u0, u1 = max(0, v - r), min(h, v + r + 1), max(0, u - r), min(w, u + r + 1)
    z = frame.depth[v0:v1, u0:u1].astype(np.float64)
    vv, uu = np.mgrid[v0:v1, u0:u1]
    ok = np.isfinite(z) & (z > 0)
    if ok.sum() < cfg.min_valid:
        raise PixelGraspError(f"only {int(ok.sum())} valid depth pixels around ({u}, {v})")
    K = frame.K
    x = (uu[ok] - K[0, 2]) * z[ok] / K[0, 0]
    y = (vv[ok] - K[1, 2]) * z[ok] / K[1, 1]
    p_cam = np.stack([x, y, z[ok]], axis=1)
    T = frame.T_base_camera
    p_base = p_cam @ T[:3, :3].T + T[:3, 3]
    centre = p_base.mean(axis=0)
    # Plane fit: the normal is the direction of least variance.
    _, s, vt = np.linalg.svd(p_base - centre, full_matrices=False)
    normal = vt[2]
    rms = s[2] / np.sqrt(len(p_base))
    if rms > cfg.max_residual_m:
        raise PixelGraspError(
            f"surface at ({u}, {v}) is not flat enough for suction (rms {rms * 1000:.1f} mm)"
        )
    camera_pos = T[:3, 3]
    if normal @ (camera_pos - centre) < 0:  # make the normal face the camera (out of the surface)
        normal = -normal
    tilt = np.degrees(np.arccos(np.clip(normal[2], -1.0, 1.0)))
    if tilt > cfg.max_tilt_deg:
        raise PixelGraspError(f"surface at ({u}, {v}) is tilted {tilt:.0f} deg, too steep to approach")
    # The contact point is the clicked pixel's own 3D point when valid, else the window centre.
    zc = frame.depth[v, u]
    if np.isfinite(zc) and zc > 0:
        pc = np.array([(u - K[0, 2]) * zc / K[0, 0], (v - K[1, 2]) * zc / K[1, 1], zc])
        point = T[:3, :3] @ pc + T[:3, 3]
    else:
        point = centre
    R = grasp_frame(-normal)
    return Grasp("suction", point, matrix_to_quat(R))
