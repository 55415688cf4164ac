"""The console's web app (Starlette): sign-in, the answering page, its live updates, the fleet view.

Routes
    GET  /                         the page (signed in) or a redirect to /login
    GET  /login                    the sign-in page (sets a one-time CSRF cookie for the sign-in)
    POST /api/login                {name, password} -> session cookie; rate-limited
    POST /api/logout               ends the session
    GET  /api/state                this person's view: the request they hold, the queue
    GET  /api/fleet                the fleet view
    GET  /api/requests/{id}/image  the request's picture, to the person holding it only
    POST /api/answer               {request_id, kind, candidate_index?, pixel?, note?}
    POST /api/skip                 {request_id}
    WS   /ws                       pushes {"type": "state" | "fleet" | "notice" | "signed_out", ...}

Security: sessions in HttpOnly SameSite=Strict cookies; every POST carries the session's CSRF token
in `X-CSRF-Token` and, when the browser sends one, an Origin equal to this server's; WebSockets
check Origin too. The broker's keys live in the server process only: nothing about them is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from console.desk import Desk, DeskError
from console.fleet import BrokerFleetSource, FleetSource
from console.sessions import RateLimitConfig, Session, Sessions, SignInLimiter, csrf_ok
from console.users import UserStore

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "pickcell_session"
LOGIN_COOKIE = "pickcell_login"
MAX_BODY_BYTES = 16 * 1024  # every JSON body the page sends is far smaller
WS_CLOSE_SIGNED_OUT = 4401


@dataclass(frozen=True)
class ConsoleConfig:
    session_ttl_s: float = 8 * 3600.0  # s a sign-in lasts
    cookie_secure: bool = False  # mark cookies Secure (set when a TLS proxy serves the console)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    tick_s: float = 0.5  # s between checks of deadlines, sessions and the broker's queue depth
    fleet_every_s: float = 2.0  # s between fleet refreshes pushed to the pages
    answer_timeout_s: float = 10.0  # s to wait for the broker to journal an answer
    reconnect_grace_s: float = 5.0  # s a person's request waits for their page to come back


class _Conn:
    """One open page (WebSocket) and its outgoing queue."""

    def __init__(self, ws: WebSocket, session: Session):
        self.ws = ws
        self.session = session
        self.out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()


class ConsoleState:
    def __init__(
        self,
        link_factory: Callable[[Callable[[str, dict], None]], Any],
        users: UserStore,
        config: ConsoleConfig,
        clock: Callable[[], float],
        fleet_factory: Callable[[Desk, Any], FleetSource] | None,
    ):
        self.link_factory = link_factory
        self.users = users
        self.config = config
        self.clock = clock
        self.sessions = Sessions(config.session_ttl_s, clock)
        self.limiter = SignInLimiter(config.rate_limit, clock)
        self.fleet_factory = fleet_factory or (lambda desk, link: BrokerFleetSource(desk, link))
        self.link: Any = None
        self.desk: Desk | None = None
        self.fleet: FleetSource | None = None
        self.conns: dict[str, set[_Conn]] = {}
        self.last_fleet: dict[str, Any] | None = None

    # ---- pushing to pages ----

    def push_state(self, names: set[str]) -> None:
        for name in names:
            conns = self.conns.get(name)
            if conns:
                view = self.desk.view(name)
                for c in conns:
                    c.out.put_nowait(view)

    def push_notice(self, name: str, text: str) -> None:
        for c in self.conns.get(name, ()):
            c.out.put_nowait({"type": "notice", "text": text})

    def push_all(self, msg: dict[str, Any]) -> None:
        for conns in self.conns.values():
            for c in conns:
                c.out.put_nowait(msg)

    def close_conns(self, pred: Callable[[_Conn], bool]) -> None:
        for conns in self.conns.values():
            for c in list(conns):
                if pred(c):
                    c.out.put_nowait({"type": "signed_out", "reason": "session ended"})
                    c.out.put_nowait(None)


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _origin_ok(conn: HTTPConnection) -> bool:
    """A browser's Origin (when sent) must be this server: no other site may drive a signed-in page."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True  # not a browser cross-site request (browsers send Origin on POST and WebSocket)
    host = conn.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def _session(st: ConsoleState, conn: HTTPConnection) -> Session | None:
    s = st.sessions.get(conn.cookies.get(SESSION_COOKIE))
    if s is not None and not st.users.exists(s.user):  # account removed: signed out at once
        st.sessions.end_user(s.user)
        return None
    return s


async def _read_json(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise DeskError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():  # never hold more than the limit, whatever the header said
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise DeskError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DeskError(400, "body is not JSON") from None


def _page(name: str, token: str) -> HTMLResponse:
    html = (STATIC / name).read_text().replace("{{CSRF}}", token)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def create_app(
    link_factory: Callable[[Callable[[str, dict], None]], Any],
    users: UserStore,
    config: ConsoleConfig | None = None,
    clock: Callable[[], float] = time.time,
    fleet_factory: Callable[[Desk, Any], FleetSource] | None = None,
) -> Starlette:
    """The app. `link_factory(on_event)` makes the broker link (a ConsoleLink) once the loop runs;
    `clock` (unix s) drives session expiry and the rate limit."""
    cfg = config or ConsoleConfig()
    st = ConsoleState(link_factory, users, cfg, clock, fleet_factory)

    def cookie_kwargs() -> dict[str, Any]:
        return {"httponly": True, "samesite": "strict", "secure": cfg.cookie_secure, "path": "/"}

    def signed_in(handler):
        async def wrapped(request: Request) -> Response:
            s = _session(st, request)
            if s is None:
                return _json_error(401, "not signed in (or the session expired): sign in again")
            if request.method == "POST":
                if not _origin_ok(request):
                    return _json_error(403, "request from another site refused")
                if not csrf_ok(s, request.headers.get("x-csrf-token")):
                    return _json_error(403, "missing or wrong CSRF token: reload the page")
            try:
                return await handler(request, s)
            except DeskError as exc:
                return _json_error(exc.status, exc.message)

        return wrapped

    # ---- pages ----

    async def index(request: Request) -> Response:
        s = _session(st, request)
        if s is None:
            return RedirectResponse("/login", status_code=303)
        return _page("index.html", s.csrf)

    async def login_page(request: Request) -> Response:
        token = secrets.token_urlsafe(32)
        resp = _page("login.html", token)
        resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, **cookie_kwargs())
        return resp

    async def api_login(request: Request) -> Response:
        if not _origin_ok(request):
            return _json_error(403, "request from another site refused")
        expected = request.cookies.get(LOGIN_COOKIE) or ""
        got = request.headers.get("x-csrf-token") or ""
        if not expected or not hmac.compare_digest(expected, got):
            return _json_error(403, "the sign-in form is stale: reload the page")
        try:
            body = await _read_json(request)
        except DeskError as exc:
            return _json_error(exc.status, exc.message)
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("name"), str)
            or not isinstance(body.get("password"), str)
        ):
            return _json_error(422, "sign in with {name, password}")
        name, password = body["name"][:64], body["password"]
        client = request.client.host if request.client else "?"
        keys = (f"addr:{client}", f"user:{name}")
        wait = st.limiter.retry_after(*keys)
        if wait > 0:
            log.warning("sign-in for %r from %s refused: too many failures", name, client)
            return _json_error(
                429,
                f"too many failed sign-ins: try again in {int(wait) + 1} s",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        ok = await run_in_threadpool(st.users.verify, name, password)  # argon2: keep the loop free
        if not ok:
            st.limiter.failed(*keys)
            log.warning("failed sign-in for %r from %s", name, client)
            return _json_error(401, "wrong name or password")
        st.limiter.succeeded(f"user:{name}")
        s = st.sessions.create(name)
        log.info("%s signed in from %s", name, client)
        resp = JSONResponse({"ok": True, "user": name, "expires": s.expires})
        resp.set_cookie(SESSION_COOKIE, s.token, max_age=int(cfg.session_ttl_s), **cookie_kwargs())
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    @signed_in
    async def api_logout(request: Request, s: Session) -> Response:
        st.sessions.end(s.token)
        st.close_conns(lambda c: c.session.token == s.token)
        resp = JSONResponse({"ok": True, "user": s.user})
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @signed_in
    async def api_state(request: Request, s: Session) -> Response:
        return JSONResponse(st.desk.view(s.user), headers={"Cache-Control": "no-store"})

    @signed_in
    async def api_fleet(request: Request, s: Session) -> Response:
        view = await st.fleet.snapshot()
        return JSONResponse({"type": "fleet", **view.to_json()}, headers={"Cache-Control": "no-store"})

    @signed_in
    async def api_image(request: Request, s: Session) -> Response:
        h = st.desk.holding(s.user, request.path_params["request_id"])
        return Response(
            h.request.image_png, media_type="image/png", headers={"Cache-Control": "private, no-store"}
        )

    @signed_in
    async def api_answer(request: Request, s: Session) -> Response:
        result = await st.desk.answer(s.user, await _read_json(request))
        return JSONResponse(result)

    @signed_in
    async def api_skip(request: Request, s: Session) -> Response:
        result = await st.desk.skip(s.user, await _read_json(request))
        return JSONResponse(result)

    # ---- live updates ----

    async def ws_endpoint(ws: WebSocket) -> None:
        s = _session(st, ws)
        if s is None or not _origin_ok(ws):
            await ws.close(code=WS_CLOSE_SIGNED_OUT)
            return
        await ws.accept()
        conn = _Conn(ws, s)
        st.conns.setdefault(s.user, set()).add(conn)
        st.desk.connect(s.user, conn)
        if st.last_fleet is not None:
            conn.out.put_nowait(st.last_fleet)

        async def sender() -> None:
            while True:
                msg = await conn.out.get()
                if msg is None:
                    await ws.close(code=WS_CLOSE_SIGNED_OUT)
                    return
                await ws.send_json(msg)

        task = asyncio.create_task(sender())
        try:
            while True:
                # The page sends nothing but keep-alives; answers go through POST (CSRF-checked).
                recv = asyncio.create_task(ws.receive_text())
                done, _ = await asyncio.wait({recv, task}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    recv.cancel()
                    break
                recv.result()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            st.conns.get(s.user, set()).discard(conn)
            if not st.conns.get(s.user):
                st.conns.pop(s.user, None)
            # A page that drops while its session is good may come back (reload, Wi-Fi): keep its
            # request a moment. A session that ended gives its request up at once.
            live = not _session_gone(st, s)
            st.desk.disconnect(s.user, conn, keep_s=cfg.reconnect_grace_s if live else 0.0)

    async def ticker() -> None:
        next_fleet = 0.0
        while True:
            await asyncio.sleep(cfg.tick_s)
            try:
                st.desk.expire_due()
                st.desk.set_broker_waiting(int(getattr(st.link, "waiting", 0)))
                st.close_conns(lambda c: _session_gone(st, c.session))
                now = time.monotonic()
                if now >= next_fleet and st.conns:
                    next_fleet = now + cfg.fleet_every_s
                    view = await st.fleet.snapshot()
                    st.last_fleet = {"type": "fleet", **view.to_json()}
                    st.push_all(st.last_fleet)
            except Exception:  # one bad tick must not stop the console
                log.exception("console tick failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        desk_box: list[Desk] = []

        def on_event(kind: str, payload: dict) -> None:  # the link's thread
            loop.call_soon_threadsafe(lambda: desk_box[0].on_link_event(kind, payload))

        st.link = st.link_factory(on_event)
        # The desk runs on wall time (the cells' deadlines); `clock` is for sessions and the rate limit.
        st.desk = Desk(st.link, answer_timeout_s=cfg.answer_timeout_s)
        desk_box.append(st.desk)
        st.desk.on_change = st.push_state
        st.desk.on_notice = st.push_notice
        st.fleet = st.fleet_factory(st.desk, st.link)
        tick = asyncio.create_task(ticker())
        try:
            yield
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
            st.close_conns(lambda c: True)
            await run_in_threadpool(st.link.close)

    routes = [
        Route("/", index),
        Route("/login", login_page),
        Route("/api/login", api_login, methods=["POST"]),
        Route("/api/logout", api_logout, methods=["POST"]),
        Route("/api/state", api_state),
        Route("/api/fleet", api_fleet),
        Route("/api/requests/{request_id}/image", api_image),
        Route("/api/answer", api_answer, methods=["POST"]),
        Route("/api/skip", api_skip, methods=["POST"]),
        WebSocketRoute("/ws", ws_endpoint),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = st
    return SecurityHeaders(app, st)


def _session_gone(st: ConsoleState, s: Session) -> bool:
    live = st.sessions.get(s.token)
    return live is None or not st.users.exists(s.user)


class SecurityHeaders:
    """Adds the headers that keep the page from being framed, sniffed or fed foreign scripts."""

    HEADERS = [
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
            b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app: Starlette, st: ConsoleState):
        self.app = app
        self.state = st  # tests and the server reach the console's state through here

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)
