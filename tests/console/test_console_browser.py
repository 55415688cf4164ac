"""End to end in a real browser: Debian's chromium (Playwright) -> the console (uvicorn) -> a real CURVE
broker -> a real cell client, and the cell's ledger (SQLite)."""

from __future__ import annotations

from consolerig import PASSWORDS, make_request, sign_in, wait_for

from hitl.ledger import Ledger


def click_pixel(page, u: int, v: int) -> tuple[int, int]:
    """Click the centre of picture pixel (u, v) as the page shows it (zoomed, scaled); returns the pixel
    the page itself maps that click to (browsers report whole CSS pixels), which the cell must receive."""
    p = page.evaluate("([u, v]) => window.__pickcell.toClient(u, v)", [u, v])
    x, y = round(p["x"]), round(p["y"])
    got = page.evaluate("([x, y]) => window.__pickcell.toImage(x, y)", [x, y])
    page.mouse.click(x, y)
    return got["u"], got["v"]


def wait_shown(page, request_id: str) -> None:
    page.wait_for_selector(f'#stage[data-request-id="{request_id}"]')


def test_sign_in_approve_one_point_at_another_and_the_ledger_names_the_person(rig, page):
    first = make_request(deadline_in_s=60, seed=1)
    second = make_request(deadline_in_s=90, seed=2)  # later deadline: shown after the first
    f1, f2 = rig.cell.ask(first), rig.cell.ask(second)

    sign_in(page, rig.url, "alice", PASSWORDS["alice"])
    page.wait_for_url(rig.url + "/")
    assert page.inner_text("#me") == "alice"
    wait_shown(page, first.request_id)
    # What the cell offered is what the page offers: one button and one ring per candidate.
    offered = [c.index for c in first.candidates]
    assert [
        int(x) for x in page.locator(".cand-btn").evaluate_all("bs => bs.map(b => b.dataset.index)")
    ] == offered
    assert page.locator("#overlay g.cand").count() == len(offered)
    assert "low confidence" in page.inner_text("#reasons")
    assert page.inner_text("#cell").startswith("cell-1")

    # The page zooms onto the candidates; z shows the whole picture and back.
    zoomed = page.get_attribute("#view", "viewBox")
    assert [float(x) for x in zoomed.split()][2] < 640
    page.keyboard.press("z")
    assert page.get_attribute("#view", "viewBox") == "0 0 640 480"
    page.click("#zoom")
    assert page.get_attribute("#view", "viewBox") == zoomed
    # Tap candidate #0 on the picture: approve.
    click_pixel(page, 200, 150)
    a1 = f1.result(15)
    wait_shown(page, second.request_id)  # the next one appears by itself

    # Tap a spot away from every candidate: pick there.
    spot = click_pixel(page, 300, 250)
    assert spot == (300, 250)  # zoomed in, a picture pixel spans more than one CSS pixel
    a2 = f2.result(15)

    assert (a1.status, a1.kind, a1.candidate_index, a1.pixel) == ("answered", "approve", 0, None)
    assert (a2.status, a2.kind, a2.candidate_index, a2.pixel) == ("answered", "point", None, (300, 250))
    assert a2.gripper is None  # no candidate near that spot: the cell chooses the gripper
    assert a1.associate_id == "alice" and a2.associate_id == "alice"
    assert getattr(a1, "via", "console") == "console"

    # The cell's ledger records what the cell received: the person, not the console.
    ledger = Ledger(rig.data / "ledger.sqlite", cell_id="cell-1")
    try:
        for req, ans in ((first, a1), (second, a2)):
            ledger.record_request(req)
            ledger.record_answer(ans)
        assert ledger.answer(first.request_id).associate_id == "alice"
        assert ledger.answer(second.request_id).pixel == (300, 250)
        assert ledger.answer(second.request_id).associate_id == "alice"
    finally:
        ledger.close()
    # Exactly those answers: the broker journaled two requests, both answered once, by alice.
    assert rig.broker.stats["answered"] == 2 and rig.broker.stats["accepted"] == 2
    page.wait_for_selector('#stage[data-request-id=""]')
    assert "Waiting for the next request" in page.inner_text("#idle")


def test_both_grippers_fit_choose_jaw_then_keys(rig, page):
    reqs = [make_request(deadline_in_s=60 + 30 * k, seed=3 + k) for k in range(4)]
    futs = [rig.cell.ask(r) for r in reqs]
    sign_in(page, rig.url, "bob", PASSWORDS["bob"])
    wait_shown(page, reqs[0].request_id)
    # #1 (jaw) and #2 (cup) sit on the same spot: the page asks which.
    click_pixel(page, 422, 302)
    page.wait_for_selector("#chooser:not([hidden])")
    page.click("#choose-jaw")
    wait_shown(page, reqs[1].request_id)
    page.keyboard.press("7")  # digit: approve #7 (no other offered number starts with 7)
    wait_shown(page, reqs[2].request_id)
    page.keyboard.press("n")  # no safe pick
    wait_shown(page, reqs[3].request_id)
    # A spot beside #1 and #2 (not on them): the cell offered both grippers there, so the page asks
    # which one to pick this spot with.
    spot = click_pixel(page, 460, 304)
    page.wait_for_selector("#chooser:not([hidden])")
    assert page.inner_text("#choose-jaw") == "Jaw here"
    page.click("#choose-jaw")
    answers = [f.result(15) for f in futs]
    assert [(a.kind, a.candidate_index) for a in answers] == [
        ("approve", 1),
        ("approve", 7),
        ("no_safe_pick", None),
        ("point", None),
    ]
    assert (answers[3].pixel, answers[3].gripper) == (spot, "parallel_jaw") and spot == (460, 304)
    assert {a.associate_id for a in answers} == {"bob"}


def test_skip_gives_the_request_to_someone_else(rig, browser):
    req = make_request(deadline_in_s=60, seed=6)
    fut = rig.cell.ask(req)
    ctx_a = browser.new_context(viewport={"width": 1024, "height": 768}, has_touch=True)
    ctx_b = browser.new_context(viewport={"width": 1024, "height": 768}, has_touch=True)
    try:
        pa, pb = ctx_a.new_page(), ctx_b.new_page()
        sign_in(pa, rig.url, "alice", PASSWORDS["alice"])
        wait_shown(pa, req.request_id)
        sign_in(pb, rig.url, "bob", PASSWORDS["bob"])
        pb.wait_for_selector("#idle:not([hidden])")
        pa.keyboard.press("s")  # alice skips: bob, free at the same console, gets it
        wait_shown(pb, req.request_id)
        pb.tap("#no-safe-pick")  # a touch tap, as on a tablet
        ans = fut.result(15)
        assert (ans.kind, ans.associate_id) == ("no_safe_pick", "bob")
    finally:
        ctx_a.close()
        ctx_b.close()


def test_wrong_password_is_refused(rig, page):
    sign_in(page, rig.url, "alice", "not-her-password")
    page.wait_for_selector("#login-error:has-text('wrong name or password')")
    assert page.url == rig.url + "/login"
    # The page stays closed to a browser without a session.
    assert page.request.get(rig.url + "/api/state").status == 401


def test_expired_session_is_refused(rig, page):
    req = make_request(deadline_in_s=120, seed=7)
    fut = rig.cell.ask(req)
    sign_in(page, rig.url, "alice", PASSWORDS["alice"])
    wait_shown(page, req.request_id)
    rig.clock.advance(8 * 3600 + 1)  # the default session lifetime has passed
    page.wait_for_url(rig.url + "/login")  # the open page is signed out by the server
    assert page.request.get(rig.url + "/api/state").status == 401
    page.goto(rig.url + "/")
    page.wait_for_url(rig.url + "/login")
    assert not fut.done()  # nothing was answered on her behalf
    wait_for(
        lambda: rig.console.state.desk.held.get(("cell-1", req.request_id)) is None,
        10,
        "the request to go back",
    )
