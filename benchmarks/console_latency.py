"""How fast the web console shows a cell's question and delivers a person's answer, in a real browser.

    .venv/bin/python benchmarks/console_latency.py --requests 300 --json OUT [--update-docs]
        [--screenshots DIR]

Everything is real and on loopback: an assist broker with CURVE (in-process thread, journal on disk),
the cell's client (`hitl.client.AssistClient`), the console (uvicorn + Starlette, its own CURVE key) and
Debian's chromium driven by Playwright, signed in as one person. The pictures are the simulator's:
a few totes are rendered and planned by the shipped model (`grasping.draw.render_plan_png` of the
offered candidates, as the cell sends them) and reused with fresh request ids.

One request at a time (the person is free, the console holds a READY at the broker):

    submit -> visible   time.time() just before the cell's `ask()`  ->  the page's requestAnimationFrame
                        after the picture decoded and was put on screen (window.__pickcell.shown)
    click -> at cell    the click's own event timestamp in the page (window.__pickcell.acted)  ->  the
                        cell's future resolved with the answer (its done-callback, time.time())

The page's clock is performance.timeOrigin + performance.now(); its offset from time.time() is measured
before and after (midpoint of an evaluate round trip) and subtracted. Clicks alternate: tap a candidate
(approve) and tap a spot away from every candidate (point). Targets: p99 <= 300 ms each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## console_latency"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TARGET_MS = 300.0


def sim_pictures(n_totes: int, seed: int) -> list[dict]:
    """Real assist pictures: totes from the simulator, planned by the shipped model, the offered
    candidates drawn as the cell draws them. Returns [{png, candidates, reasons, model_version}]."""
    from grasping.draw import offered_indices, render_plan_png
    from hitl.messages import CandidateView
    from sim.stack import build_sim_stack

    stack = build_sim_stack(catalog="procedural", objects_per_tote=8, seed=seed, planner="learned")
    out = []
    try:
        for _ in range(n_totes):
            stack.feed.next_tote()
            frame = stack.camera.capture()
            plan = stack.controller.planner(frame)
            idx = offered_indices(plan, 20)
            views = tuple(
                CandidateView(k, int(plan.candidates[k].pixel[0]), int(plan.candidates[k].pixel[1]),
                              plan.candidates[k].grasp.gripper, float(plan.candidates[k].score))
                for k in idx
            )  # fmt: skip
            out.append(
                {
                    "png": render_plan_png(frame, plan, indices=idx),
                    "candidates": views,
                    "reasons": tuple(plan.reasons) or ("low confidence",),
                    "model_version": plan.model_version,
                    "size": (frame.shape[1], frame.shape[0]),
                }
            )
    finally:
        stack.close()
    return out


def free_spot(cands, w: int, h: int, rng: np.random.Generator, min_px: float = 60.0) -> tuple[int, int]:
    """A pixel away from every candidate (a tap there is a 'point' answer, sent at once: no candidate within
    the page's 48 px to ask cup or jaw about), near them (inside the part the page zooms onto)."""
    us, vs = [c.u for c in cands], [c.v for c in cands]
    lo_u, hi_u = max(10, min(us) - 80), min(w - 10, max(us) + 80)
    lo_v, hi_v = max(10, min(vs) - 80), min(h - 10, max(vs) + 80)
    for _ in range(2000):
        u, v = int(rng.integers(lo_u, hi_u)), int(rng.integers(lo_v, hi_v))
        if all(np.hypot(c.u - u, c.v - v) > min_px for c in cands):
            return u, v
    raise RuntimeError("no free spot near the candidates")


def lonely_candidate(cands, min_px: float = 30.0):
    """A candidate with no candidate of the other gripper within min_px: a tap on it approves it at once
    (with both grippers under the finger the page asks which). The best such one."""
    for c in cands:
        if all(o.gripper == c.gripper or np.hypot(c.u - o.u, c.v - o.v) > min_px for o in cands):
            return c
    return None


def page_clock_offset(page) -> tuple[float, float]:
    """(page clock - time.time(), half round trip) in s, best of 5 evaluate round trips."""
    best = None
    for _ in range(5):
        t0 = time.time()
        t_page = page.evaluate("performance.timeOrigin + performance.now()") / 1000.0
        t1 = time.time()
        cand = (t_page - (t0 + t1) / 2, (t1 - t0) / 2)
        if best is None or cand[1] < best[1]:
            best = cand
    return best


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run(args: argparse.Namespace) -> dict:
    from playwright.sync_api import sync_playwright

    from console.app import ConsoleConfig
    from console.demo import admit, new_key
    from console.server import BrokerAccess, ConsoleServer
    from console.users import UserStore
    from hitl.broker import Broker, BrokerConfig
    from hitl.client import AssistClient
    from hitl.keys import ClientKeys, load_public
    from hitl.messages import AssistRequest

    load_start = os.getloadavg()
    t_setup = time.perf_counter()
    pictures = sim_pictures(args.totes, args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="console-latency-")
    data = Path(tmp.name)
    keys = data / "keys"
    for name, role in (("broker", None), ("cell-1", "cell"), ("console", "console")):
        new_key(keys, name, role)
    admit(keys, "cell-1", "cell")
    admit(keys, "console", "console")
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", data_dir=data / "broker", keys_dir=keys))
    endpoint = broker.start()
    users = UserStore(data / "users.sqlite")
    users.add("bench", "bench-password")
    console = ConsoleServer(BrokerAccess.from_keys_dir(endpoint, keys, "console"), users, ConsoleConfig())
    url = console.start()
    cell = AssistClient(
        endpoint, "cell-1", ClientKeys.from_file(keys / "cell-1.key_secret"), load_public(keys / "broker.key")
    )
    cell.start()
    rng = np.random.default_rng(args.seed)
    visible_ms: list[float] = []
    answer_ms: list[float] = []
    kinds = {"approve": 0, "point": 0}
    result: dict = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ctx = browser.new_context(viewport={"width": args.width, "height": args.height})
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto(url + "/login")
            page.fill("#name", "bench")
            page.fill("#password", "bench-password")
            page.click("#sign-in")
            page.wait_for_url(url + "/")
            page.wait_for_selector("#idle:not([hidden])")
            off0, rt0 = page_clock_offset(page)
            print(f"set-up {time.perf_counter() - t_setup:.1f} s; page clock offset {off0 * 1e3:.2f} ms "
                  f"(+-{rt0 * 1e3:.2f})", flush=True)  # fmt: skip
            n_total = args.requests + args.warmup
            for i in range(n_total):
                pic = pictures[i % len(pictures)]
                w, h = pic["size"]
                now = time.time()
                req = AssistRequest(
                    cell_id="cell-1",
                    deadline=now + 60.0,
                    image_png=pic["png"],
                    candidates=pic["candidates"],
                    reasons=pic["reasons"],
                    created=now,
                    context={"tote_id": f"bench-{i}", "model_version": pic["model_version"]},
                )
                done_at: dict[str, float] = {}

                def on_done(f: Future, rid: str = req.request_id, done_at: dict = done_at) -> None:
                    done_at[rid] = time.time()

                t_submit = time.time()
                fut = cell.ask(req)
                fut.add_done_callback(on_done)
                rid = req.request_id
                t_shown = (
                    page.wait_for_function(
                        "rid => window.__pickcell.shown[rid]", arg=rid, polling="raf"
                    ).json_value()
                    / 1000.0
                )
                c = lonely_candidate(pic["candidates"]) if i % 2 == 0 else None
                if c is not None:
                    u, v, kind = c.u, c.v, "approve"
                else:
                    (u, v), kind = free_spot(pic["candidates"], w, h, rng), "point"
                # The page maps picture pixels to the screen (zoomed onto the candidates); browsers report
                # whole CSS pixels, so the cell must receive the pixel the page maps the rounded click to.
                pt = page.evaluate("([u, v]) => window.__pickcell.toClient(u, v)", [u, v])
                x, y = round(pt["x"]), round(pt["y"])
                if kind == "point":
                    got = page.evaluate("([x, y]) => window.__pickcell.toImage(x, y)", [x, y])
                    u, v = got["u"], got["v"]
                page.mouse.click(x, y)
                ans = fut.result(30)
                t_acted = page.evaluate("rid => window.__pickcell.acted[rid]", rid) / 1000.0
                assert ans.status == "answered" and ans.kind == kind, (ans, kind)
                if kind == "approve":
                    assert ans.candidate_index == c.index
                else:
                    assert tuple(ans.pixel) == (u, v), (ans.pixel, (u, v))
                if i >= args.warmup:
                    visible_ms.append((t_shown - off0 - t_submit) * 1e3)
                    answer_ms.append((done_at[rid] - (t_acted - off0)) * 1e3)
                    kinds[kind] += 1
                page.wait_for_selector('#stage[data-request-id=""]')  # idle again before the next one
                if (i + 1) % 50 == 0:
                    print(f"{i + 1}/{n_total}: visible p50 {pct(visible_ms, 50):.1f} ms, "
                          f"answer p50 {pct(answer_ms, 50):.1f} ms", flush=True)  # fmt: skip
            off1, rt1 = page_clock_offset(page)
            if args.screenshots:
                result["screenshots"] = screenshots(browser, url, cell, pictures, Path(args.screenshots))
            ctx.close()
            browser.close()
    finally:
        cell.close()
        console.stop()
        broker.stop()
        users.close()
        tmp.cleanup()
    load_end = os.getloadavg()
    result.update(
        {
            "requests": len(visible_ms),
            "warmup": args.warmup,
            "answers": kinds,
            "viewport": [args.width, args.height],
            "image_bytes_mean": int(np.mean([len(p["png"]) for p in pictures])),
            "image_size": list(pictures[0]["size"]),
            "candidates_mean": float(np.mean([len(p["candidates"]) for p in pictures])),
            "submit_to_visible_ms": {
                q: round(pct(visible_ms, v), 1) for q, v in (("p50", 50), ("p99", 99), ("max", 100))
            },
            "click_to_cell_ms": {
                q: round(pct(answer_ms, v), 1) for q, v in (("p50", 50), ("p99", 99), ("max", 100))
            },
            "page_clock_offset_ms": [round(off0 * 1e3, 2), round(off1 * 1e3, 2)],
            "page_clock_uncertainty_ms": round(max(rt0, rt1) * 1e3, 2),
            "target_p99_ms": TARGET_MS,
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end],
            "machine": f"{os.cpu_count()}-core {platform.machine()}, Python {platform.python_version()}",
            "chromium": browser_version(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    )
    result["meets_target"] = (
        result["submit_to_visible_ms"]["p99"] <= TARGET_MS and result["click_to_cell_ms"]["p99"] <= TARGET_MS
    )
    return result


def screenshots(browser, url: str, cell, pictures: list[dict], out: Path) -> list[str]:
    """The real page with a real request, at desktop (1440x900) and tablet (1024x768, touch) size."""
    from hitl.messages import AssistRequest

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, vp, touch in (
        ("console-desktop.png", (1440, 900), False),
        ("console-tablet.png", (1024, 768), True),
    ):
        ctx = browser.new_context(viewport={"width": vp[0], "height": vp[1]}, has_touch=touch)
        page = ctx.new_page()
        page.goto(url + "/login")
        page.fill("#name", "bench")
        page.fill("#password", "bench-password")
        page.click("#sign-in")
        page.wait_for_url(url + "/")
        pic = pictures[1 % len(pictures)]
        now = time.time()
        ctx_ = {"tote_id": "cell-1-tote-00042", "model_version": pic["model_version"]}
        req = AssistRequest(
            "cell-1",
            now + 30.0,
            pic["png"],
            pic["candidates"],
            pic["reasons"],
            created=now - 2.0,
            context=ctx_,
        )
        fut = cell.ask(req)
        page.wait_for_function("rid => window.__pickcell.shown[rid]", arg=req.request_id)
        page.wait_for_timeout(300)  # let the countdown tick once
        page.screenshot(path=str(out / name))
        written.append(str(out / name))
        if name == "console-desktop.png":
            page.click("#tab-fleet")
            # wait for a fleet push that has seen this request
            page.wait_for_selector("tr[data-cell='cell-1'] td:has-text('waiting for a person')")
            page.screenshot(path=str(out / "console-fleet.png"))
            written.append(str(out / "console-fleet.png"))
            page.click("#tab-answer")
        page.keyboard.press("n")
        fut.result(30)
        ctx.close()
    return written


def browser_version() -> str:
    import subprocess

    try:
        return subprocess.run(
            [CHROMIUM, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def update_docs(res: dict, command: str) -> None:
    v, a = res["submit_to_visible_ms"], res["click_to_cell_ms"]
    size = f"{res['image_size'][0]}x{res['image_size'][1]} PNG"
    kib = f"{res['image_bytes_mean'] / 1024:.0f} KiB"
    n = f"{res['requests']} ({res['answers']['approve']} approve, {res['answers']['point']} point)"
    off = res["page_clock_offset_ms"]
    lines = [
        SECTION,
        "",
        "The web console in a real browser (Debian's chromium, headless, driven by Playwright): a cell's "
        "request submitted -> visible on the page, and a click on the page -> the answer received by the "
        "cell. Broker (CURVE, journal on disk), cell client, console (uvicorn + Starlette) and browser all "
        "on this machine, loopback. One request at a time; the pictures are the simulator's totes planned "
        f"by the shipped model ({size}, {kib} on average, {res['candidates_mean']:.1f} candidates). Clicks "
        f"alternate: a candidate (approve) and a free spot (point). Target: p99 <= {TARGET_MS:.0f} ms each.",
        "",
        f"Command: `{command}`",
        f"Machine: {res['machine']}, {res['chromium']}; load average {res['load_average_start']} at the "
        f"start, {res['load_average_end']} at the end (other engineers' jobs share the 2 cores; above "
        f"about 2 the numbers are inflated). Measured {res['when']}.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| requests measured (after {res['warmup']} warm-up) | {n} |",
        f"| submit -> visible p50 / p99 / max (ms) | {v['p50']} / {v['p99']} / {v['max']} |",
        f"| click -> answer at the cell p50 / p99 / max (ms) | {a['p50']} / {a['p99']} / {a['max']} |",
        f"| page clock offset before / after (ms), uncertainty | {off[0]} / {off[1]}, "
        f"+-{res['page_clock_uncertainty_ms']} |",
        f"| viewport | {res['viewport'][0]}x{res['viewport'][1]} |",
        f"| meets the target | {'yes' if res['meets_target'] else 'NO'} |",
        "",
    ]
    text = "\n".join(lines)
    doc = DOC.read_text()
    if SECTION in doc:
        start = doc.index(SECTION)
        nxt = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[nxt:] if nxt >= 0 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="requests measured (default 300)")
    ap.add_argument("--warmup", type=int, default=10, help="requests before measuring (default 10)")
    ap.add_argument(
        "--totes", type=int, default=6, help="simulated totes whose pictures are used (default 6)"
    )
    ap.add_argument(
        "--seed", type=int, default=1000, help="seed of the totes and the click spots (default 1000)"
    )
    ap.add_argument("--width", type=int, default=1024, help="browser viewport width (default 1024, a tablet)")
    ap.add_argument("--height", type=int, default=768, help="browser viewport height (default 768)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--update-docs", action="store_true", help=f"rewrite the {SECTION} section of docs/benchmarks.md"
    )
    ap.add_argument("--screenshots", help="also save the page at desktop and tablet size into this folder")
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.update_docs:
        cmd = "python benchmarks/console_latency.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--update-docs"
        )
        update_docs(res, cmd.strip())
    return 0 if res["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
