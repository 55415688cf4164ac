"""The simulated overhead RGB-D camera. Implements `arm.interfaces.Camera`.

Rendering: PyBullet's CPU TinyRenderer (in DIRECT mode the OpenGL renderer falls back to it anyway),
one render per `capture()`. The z-buffer is converted to metric depth along the optical axis with
z = far * near / (far - (far - near) * zbuf), and the OpenGL camera axes (y up, looking down -z)
are turned into OpenCV axes (y down, z forward) for `Frame.T_base_camera`.

Noise model (seeded, per camera):
- a per-image multiplicative scale error drawn from Gamma(k, 1/k) (mean 1; the Dex-Net model, with a
  shape that gives a 0.3 % scale error like a calibrated industrial sensor),
- per-pixel Gaussian noise whose sigma grows with range: sigma = a + b * z^2 (structured-light and
  stereo sensors lose precision with the square of the distance),
- missing pixels (NaN) at depth edges, where real sensors lose the return or see mixed pixels, each
  edge pixel dropping out with probability `edge_dropout`, plus rare random dropouts.

The segmentation buffer is kept as `last_segmentation` (ground truth, for metrics only); it is not
part of the Frame a planner receives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pybullet as p

from arm.interfaces import CameraError
from grasping.types import Frame
from sim.config_sim_camera import SimCameraConfig

log = logging.getLogger(__name__)

# OpenGL camera axes -> OpenCV camera axes: flip y and z.
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


class SimCamera:
    """A fixed camera `height_above_floor` above `target` (base frame), looking straight down."""

    def __init__(
        self,
        client_id: int,
        target: np.ndarray,
        config: SimCameraConfig | None = None,
        seed: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client_id = client_id
        self.cfg = config or SimCameraConfig()
        self.capture_s = self.cfg.capture_s  # s, one frame's exposure and readout
        self.rng = np.random.default_rng(seed)
        self.clock = clock or (lambda: 0.0)
        self._count = 0
        c = self.cfg
        tgt = np.asarray(target, dtype=np.float64)
        eye = np.array([tgt[0], tgt[1], tgt[2] + c.height_above_floor])
        # Up vector +x of the base: image rows run along base x, columns along base y.
        self.view = p.computeViewMatrix(
            eye.tolist(), tgt.tolist(), [1.0, 0.0, 0.0], physicsClientId=client_id
        )
        self.proj = p.computeProjectionMatrixFOV(
            c.vertical_fov_deg, c.width / c.height, c.near, c.far, physicsClientId=client_id
        )
        V = np.array(self.view, dtype=np.float64).reshape(4, 4, order="F")  # world -> GL camera
        self.T_base_camera = np.linalg.inv(V) @ _GL_TO_CV
        fy = (c.height / 2.0) / np.tan(np.radians(c.vertical_fov_deg) / 2.0)
        # Pixel (u, v) = (column, row) indices: centres sit at half-pixel offsets in GL NDC.
        self.K = np.array([[fy, 0.0, (c.width - 1) / 2.0], [0.0, fy, (c.height - 1) / 2.0], [0.0, 0.0, 1.0]])
        self.last_segmentation: np.ndarray | None = None  # (H, W) int32 body ids; ground truth only
        self.last_clean_depth: np.ndarray | None = None  # (H, W) float32 noiseless depth; metrics only

    def render(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rgb uint8 (H, W, 3), exact depth float32 (H, W) m, segmentation int32 (H, W))."""
        c = self.cfg
        out = p.getCameraImage(
            c.width,
            c.height,
            self.view,
            self.proj,
            renderer=p.ER_TINY_RENDERER,
            physicsClientId=self.client_id,
        )
        w, h, rgba, zbuf, seg = out
        if w != c.width or h != c.height:
            raise CameraError(f"renderer returned {w}x{h}, expected {c.width}x{c.height}")
        rgba = np.asarray(rgba, dtype=np.uint8).reshape(h, w, 4)
        zbuf = np.asarray(zbuf, dtype=np.float64).reshape(h, w)
        depth = (c.far * c.near / (c.far - (c.far - c.near) * zbuf)).astype(np.float32)
        seg = np.asarray(seg, dtype=np.int64).reshape(h, w)
        # Segmentation packs (link + 1) << 24 | body when link info is on; we keep the body id.
        seg = np.where(seg >= 0, seg & ((1 << 24) - 1), -1).astype(np.int32)
        return rgba[:, :, :3].copy(), depth, seg

    def add_noise(self, depth: np.ndarray) -> np.ndarray:
        """Apply the sensor model (see module docstring) to an exact depth image."""
        c = self.cfg
        z = depth.astype(np.float32)  # float32 throughout: the noise is millimetres, speed matters
        scale = np.float32(self.rng.gamma(c.gamma_shape, 1.0 / c.gamma_shape))
        sigma = np.float32(c.noise_sigma_base) + np.float32(c.noise_sigma_quadratic) * z * z
        noisy = z * scale + self.rng.standard_normal(z.shape, dtype=np.float32) * sigma
        # Edges: the largest jump to a 4-neighbour.
        dx = np.abs(np.diff(z, axis=1))
        dy = np.abs(np.diff(z, axis=0))
        jump = np.zeros_like(z)
        jump[:, 1:] = dx
        jump[:, :-1] = np.maximum(jump[:, :-1], dx)
        jump[1:, :] = np.maximum(jump[1:, :], dy)
        jump[:-1, :] = np.maximum(jump[:-1, :], dy)
        u = self.rng.random(z.shape, dtype=np.float32)
        missing = ((jump > c.edge_threshold) & (u < c.edge_dropout)) | (u > 1.0 - c.random_dropout)
        noisy[missing] = np.nan
        return noisy.astype(np.float32)

    def capture(self) -> Frame:
        """Render one frame. Raises CameraError if the renderer fails."""
        try:
            rgb, depth, seg = self.render()
        except p.error as exc:  # e.g. the physics client went away
            raise CameraError(f"render failed: {exc}") from exc
        self.last_segmentation = seg
        self.last_clean_depth = depth
        out_depth = self.add_noise(depth) if self.cfg.noise else depth
        self._count += 1
        return Frame(
            depth=out_depth,
            rgb=rgb,
            K=self.K,
            T_base_camera=self.T_base_camera,
            stamp=float(self.clock()),
            frame_id=f"sim-{self._count:06d}",
        )


def depth_to_points(depth: np.ndarray, K: np.ndarray, T_base_camera: np.ndarray) -> np.ndarray:
    """(N, 3) base-frame points of the valid (finite, > 0) pixels of a depth image."""
    v, u = np.nonzero(np.isfinite(depth) & (depth > 0))
    z = depth[v, u].astype(np.float64)
    x = (u - K[0, 2]) * z / K[0, 0]
    y = (v - K[1, 2]) * z / K[1, 1]
    pts_cam = np.stack([x, y, z, np.ones_like(z)], axis=1)
    return (pts_cam @ T_base_camera.T)[:, :3]
