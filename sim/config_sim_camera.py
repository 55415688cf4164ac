"""Configuration of the simulated overhead RGB-D camera (device in sim/sim_camera.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimCameraConfig:
    """A fixed structured-light/ToF-like camera above the tote, looking straight down."""

    width: int = 640  # px
    height: int = 480  # px
    vertical_fov_deg: float = 58.0  # deg, vertical field of view (horizontal follows from the aspect)
    height_above_floor: float = 0.95  # m, optical centre above the tote floor
    near: float = 0.1  # m, renderer near plane
    far: float = 2.0  # m, renderer far plane
    noise_sigma_base: float = 0.0015  # m, depth noise std at zero range
    noise_sigma_quadratic: float = 0.0025  # m/m^2, growth of the std with range squared
    gamma_shape: float = 1.0e5  # unitless, shape k of the per-image Gamma(k, 1/k) scale (std 0.3 %)
    edge_threshold: float = 0.01  # m, depth jump to a neighbour pixel that marks an edge
    edge_dropout: float = 0.6  # probability that an edge pixel is missing (NaN)
    random_dropout: float = 0.002  # probability that any pixel is missing
    noise: bool = True  # False: exact rendered depth (tests of geometry)
    # s, exposure and readout of one frame (what the bench charges for each capture the arm waits
    # for; a capture that fits inside a gripper's release is taken while the arm stands anyway)
    capture_s: float = 0.1
