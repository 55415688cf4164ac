"""The picture an associate sees when the cell asks for help: numbered candidates over the RGB image.

The candidates drawn are `offered_indices(plan)`: the best `max_candidates` distinct ones
(near-duplicates of a better one, same gripper within 12 px, are left out), or exactly the indices
the caller offers a person (the controller passes the list it puts in the AssistRequest).
Suction candidates are circles at the cup's contact point; parallel-jaw candidates are a line
between the two fingertips (projected with K and T_base_camera) with a dot at the centre. Colour
runs red (0) -> yellow -> green (1) with the candidate's score (calibrated p(success) when the plan
has it, else the analytic score). Numbers are the candidates' positions in the Plan (0 = best), the
same indices the associate answers with. The decision and the reasons are written on top. A
question is about one item: that item is boxed and labelled "asked about this item" (the others'
candidates are shown too, after it, but the answer is about the boxed one).

Pillow only (installed with matplotlib): a plan's picture costs a few milliseconds, not the ~0.5 s
of importing pyplot.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grasping.types import Frame, ItemCluster, Plan

_OUTLINE = (0, 0, 0)
ASKED_COLOUR = (0, 230, 255)  # the box around the item a question is about


def score_colour(score: float) -> tuple[int, int, int]:
    """Red (0) -> yellow (0.5) -> green (1)."""
    s = float(np.clip(score, 0.0, 1.0))
    if s < 0.5:
        return 230, int(round(460 * s)), 30
    return int(round(230 * (1.0 - s) * 2)), 200, 30


def _project(frame: Frame, p_base: np.ndarray) -> np.ndarray:
    T_cam_base = np.linalg.inv(np.asarray(frame.T_base_camera))
    p = np.asarray(p_base, dtype=np.float64).reshape(-1, 3) @ T_cam_base[:3, :3].T + T_cam_base[:3, 3]
    K = np.asarray(frame.K)
    z = np.where(p[:, 2] > 1e-6, p[:, 2], np.nan)
    return np.stack([K[0, 0] * p[:, 0] / z + K[0, 2], K[1, 1] * p[:, 1] / z + K[1, 2]], axis=1)


PixelBox = tuple[int, int, int, int]  # (u0, v0, u1, v1), pixels


def item_pixels(frame: Frame, cluster: ItemCluster) -> tuple[tuple[int, int], PixelBox] | None:
    """Where an item lies in the frame: (its centroid's pixel (u, v), the pixel box (u0, v0, u1, v1)
    around its bounding box's eight corners), or None when it does not project into the frame."""
    lo, hi = np.asarray(cluster.lo, dtype=np.float64), np.asarray(cluster.hi, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    px = _project(frame, np.vstack([np.asarray(cluster.centroid, dtype=np.float64), corners]))
    if not np.isfinite(px).all():
        return None
    h, w = frame.shape
    c = np.rint(px[0]).astype(int)
    u0, v0 = np.floor(px[1:].min(axis=0)).astype(int)
    u1, v1 = np.ceil(px[1:].max(axis=0)).astype(int)
    u0, u1 = int(np.clip(u0, 0, w - 1)), int(np.clip(u1, 0, w - 1))
    v0, v1 = int(np.clip(v0, 0, h - 1)), int(np.clip(v1, 0, h - 1))
    if not (0 <= c[0] < w and 0 <= c[1] < h) or u1 <= u0 or v1 <= v0:
        return None
    return (int(c[0]), int(c[1])), (u0, v0, u1, v1)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def offered_indices(
    plan: Plan,
    max_candidates: int = 20,
    exclude: Callable[[int], bool] | None = None,
    min_sep_px: float = 12.0,
) -> list[int]:
    """The candidates to show and offer a person, as Plan indices, best first: at most
    `max_candidates`, none for which `exclude(index)` is true (e.g. spots that already failed), and no
    near-duplicate of one already chosen (same gripper within `min_sep_px`), so the choices are distinct.

    A request's candidate list and its picture must both come from this one list: the person answers
    with the numbers they see, and a number drawn but not offered (or offered but not drawn) is a
    wrong or impossible answer.
    """
    if max_candidates < 0:
        raise ValueError(f"max_candidates must be >= 0, got {max_candidates}")
    shown: list[int] = []
    for i, c in enumerate(plan.candidates):
        if len(shown) >= max_candidates:
            break
        if exclude is not None and exclude(i):
            continue
        if any(
            c.grasp.gripper == plan.candidates[o].grasp.gripper
            and np.hypot(c.pixel[0] - plan.candidates[o].pixel[0], c.pixel[1] - plan.candidates[o].pixel[1])
            < min_sep_px
            for o in shown
        ):
            continue
        shown.append(i)
    return shown


def render_plan(
    frame: Frame,
    plan: Plan,
    max_candidates: int = 20,
    indices: Sequence[int] | None = None,
    item: int | None = None,
) -> Image.Image:
    """The annotated picture as a PIL image of the frame's size: the candidates `indices` (Plan
    indices, e.g. from `offered_indices`), or `offered_indices(plan, max_candidates)` when None.
    `item` (an index into plan.clusters): the item a question is about, boxed and labelled, so the
    person answers about that item and not about one the cell is about to pick by itself."""
    if indices is None:
        indices = offered_indices(plan, max_candidates)
    bad = [i for i in indices if not 0 <= i < len(plan.candidates)]
    if bad:
        raise ValueError(f"candidate indices {bad} are not in the plan (0..{len(plan.candidates) - 1})")
    img = Image.fromarray(np.asarray(frame.rgb, dtype=np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    h, w = frame.shape
    scale = max(1.0, w / 640.0)
    small, big = _font(int(11 * scale)), _font(int(13 * scale))
    if item is not None and 0 <= item < len(plan.clusters):
        where = item_pixels(frame, plan.clusters[item])
        if where is not None:
            u0, v0, u1, v1 = where[1]
            pad = int(4 * scale)
            box = [u0 - pad, v0 - pad, u1 + pad, v1 + pad]
            draw.rectangle(box, outline=_OUTLINE, width=int(5 * scale))
            draw.rectangle(box, outline=ASKED_COLOUR, width=int(3 * scale))
            draw.text(
                (box[0], max(0, box[1] - int(15 * scale))),
                "asked about this item",
                fill=ASKED_COLOUR,
                font=small,
                stroke_width=2,
                stroke_fill=_OUTLINE,
            )
    shown = [(i, plan.candidates[i]) for i in indices][::-1]  # worst first, so the best end up on top
    for i, c in shown:
        col = score_colour(c.score)
        u, v = c.pixel
        if c.grasp.gripper == "suction":
            r = 6 * scale
            draw.ellipse([u - r, v - r, u + r, v + r], outline=_OUTLINE, width=int(3 * scale))
            draw.ellipse([u - r, v - r, u + r, v + r], outline=col, width=int(2 * scale))
        else:
            half = c.grasp.R[:, 0] * (c.grasp.width / 2.0)
            tips = _project(frame, np.stack([c.grasp.position - half, c.grasp.position + half]))
            if np.isfinite(tips).all():
                line = [tuple(tips[0]), tuple(tips[1])]
                draw.line(line, fill=_OUTLINE, width=int(4 * scale))
                draw.line(line, fill=col, width=int(2 * scale))
                for t in tips:
                    draw.ellipse(
                        [t[0] - 2 * scale, t[1] - 2 * scale, t[0] + 2 * scale, t[1] + 2 * scale], fill=col
                    )
            draw.ellipse(
                [u - 2 * scale, v - 2 * scale, u + 2 * scale, v + 2 * scale], fill=col, outline=_OUTLINE
            )
        draw.text(
            (u + 7 * scale, v - 7 * scale),
            str(i),
            fill=(255, 255, 255),
            font=small,
            stroke_width=2,
            stroke_fill=_OUTLINE,
        )

    # Header: decision and reasons; footer: legend.
    lines = [f"{plan.decision.upper()}  ({len(plan.candidates)} candidates, model {plan.model_version})"]
    lines += list(plan.reasons[:4])
    y = 4
    for k, text in enumerate(lines):
        draw.text(
            (6, y),
            text,
            fill=(255, 255, 255),
            font=big if k == 0 else small,
            stroke_width=2,
            stroke_fill=_OUTLINE,
        )
        y += int((16 if k == 0 else 14) * scale)
    legend_y = h - int(18 * scale)
    x = 6
    draw.text(
        (x, legend_y),
        "O suction   - jaw   score:",
        fill=(255, 255, 255),
        font=small,
        stroke_width=2,
        stroke_fill=_OUTLINE,
    )
    x += int(170 * scale)
    for s in np.linspace(0.0, 1.0, 11):
        draw.rectangle([x, legend_y + 2, x + 8 * scale, legend_y + 12 * scale], fill=score_colour(s))
        x += int(9 * scale)
    draw.text(
        (x + 4, legend_y), "0 .. 1", fill=(255, 255, 255), font=small, stroke_width=2, stroke_fill=_OUTLINE
    )
    return img


def render_plan_png(
    frame: Frame,
    plan: Plan,
    max_candidates: int = 20,
    indices: Sequence[int] | None = None,
    item: int | None = None,
) -> bytes:
    """PNG bytes of the annotated picture (what an AssistRequest carries); `indices` and `item` as in
    render_plan."""
    buf = io.BytesIO()
    render_plan(frame, plan, max_candidates, indices, item).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def draw_plan(frame: Frame, plan: Plan, out_png: str | Path, max_candidates: int = 20) -> Path:
    """Write the annotated picture to `out_png`; returns the path."""
    out = Path(out_png)
    out.write_bytes(render_plan_png(frame, plan, max_candidates))
    return out
