// The answering page: the held request's picture with its candidates, taps and keys -> answers,
// live updates over a WebSocket, and the fleet view. No framework, no build step.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const HIT_PX = 26; // display pixels around a candidate that count as tapping it (finger-sized)
  const AROUND_PX = 48; // picture pixels: offered candidates this close to a tapped spot say what fits there

  let req = null; // the request on screen (server's view), or null
  let shownId = ""; // request id whose picture is on screen
  let clockOffset = 0; // server time - local time, s
  let busy = false; // an answer is on its way
  let digits = "";
  let digitTimer = null;
  let pendingChoice = null; // {cup, jaw}: what each chooser button does while it is open
  let zoomed = true; // show the part of the picture around the candidates, larger (z toggles)

  // Timestamps for benchmarks/console_latency.py (epoch ms): when a request became visible, and when
  // the person's click/key for it happened.
  window.__pickcell = { shown: {}, acted: {} };
  const epochMs = (t) => performance.timeOrigin + t;

  // Back to the sign-in page, once (a closing WebSocket and a "signed_out" message both ask for it).
  let leaving = false;
  function toLogin() {
    if (leaving) return;
    leaving = true;
    window.location.assign("/login");
  }

  // ---- server calls ----

  async function post(path, body) {
    const resp = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    if (resp.status === 401) { toLogin(); throw new Error("signed out"); }
    let data = {};
    try { data = await resp.json(); } catch (e) { /* no body */ }
    if (!resp.ok) throw new Error(data.error || ("error " + resp.status));
    return data;
  }

  async function send(kind, extra, label, evTime) {
    if (!req || busy) return;
    const rid = req.request_id;
    window.__pickcell.acted[rid] = epochMs(evTime !== undefined ? evTime : performance.now());
    busy = true;
    setButtons();
    try {
      if (kind === "skip") {
        await post("/api/skip", { request_id: rid });
        notice("Skipped: someone else will get it.");
      } else {
        await post("/api/answer", Object.assign({ request_id: rid, kind }, extra));
        notice("Sent: " + label + ".");
      }
    } catch (e) {
      notice("Not sent: " + e.message, true);
    } finally {
      busy = false;
      setButtons();
    }
  }

  const approve = (c, t) => send("approve", { candidate_index: c.index }, "approve #" + c.index, t);
  const point = (u, v, t, gripper) => send(
    "point", gripper ? { pixel: [u, v], gripper } : { pixel: [u, v] },
    "pick at (" + u + ", " + v + ")" + (gripper ? " with the " + gripperName(gripper) : ""), t);

  // ---- showing a request ----

  function notice(text, bad) {
    const n = $("notice");
    n.textContent = text;
    n.classList.toggle("bad", !!bad);
  }

  function setButtons() {
    const on = !!req && !busy;
    $("no-safe-pick").disabled = !on;
    $("skip").disabled = !on;
    for (const b of document.querySelectorAll(".candidates button")) b.disabled = !on;
  }

  function fmtAge(s) {
    if (s === null || s === undefined) return "—";
    return s < 60 ? s.toFixed(0) + " s" : (s / 60).toFixed(1) + " min";
  }

  function showQueue(q) {
    const text = q.waiting_at_broker + " waiting" + (q.unassigned_here ? " (+" + q.unassigned_here + " here)" : "")
      + (q.oldest_asked_s !== null ? " · oldest asked " + fmtAge(q.oldest_asked_s) + " ago" : "");
    $("queue").textContent = "queue: " + text;
    $("idle-queue").textContent = "Queue: " + text + ". " + q.people_here + " signed in here.";
  }

  function gripperName(g) { return g === "suction" ? "cup" : g === "parallel_jaw" ? "jaw" : g; }

  // Tap targets over the cell's picture: a faint ring at each offered candidate (the cell drew the
  // numbers and grippers; grasping.draw draws exactly the offered list).
  function drawOverlay(r) {
    const svg = $("overlay");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const scale = Math.max(1, r.width / 640);
    for (const c of r.candidates) {
      const g = document.createElementNS(SVG, "g");
      g.setAttribute("class", "cand " + (c.gripper === "suction" ? "cup" : "jaw"));
      g.setAttribute("data-index", String(c.index));
      const ring = document.createElementNS(SVG, "circle");
      ring.setAttribute("cx", c.u); ring.setAttribute("cy", c.v); ring.setAttribute("r", 12 * scale);
      g.appendChild(ring);
      const title = document.createElementNS(SVG, "title"); // the number itself is on the cell's picture
      title.textContent = "#" + c.index + " " + gripperName(c.gripper);
      g.appendChild(title);
      svg.appendChild(g);
    }
  }

  function listCandidates(r) {
    const box = $("candidates");
    while (box.firstChild) box.removeChild(box.firstChild);
    for (const c of r.candidates) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "cand-btn " + (c.gripper === "suction" ? "cup" : "jaw");
      b.setAttribute("data-index", String(c.index));
      b.textContent = "#" + c.index + " " + gripperName(c.gripper) + " " + Math.round(c.p_success * 100) + "%";
      b.addEventListener("click", (ev) => approve(c, ev.timeStamp));
      box.appendChild(b);
    }
    if (!r.candidates.length) box.textContent = "The cell offers no candidate: tap a spot, or say no safe pick.";
  }

  // The part of the picture to show: around the offered candidates (a margin for pointing at a spot
  // beside them), at least 240 px wide, in the picture's own aspect; or all of it.
  function viewBox(r) {
    if (!zoomed || !r.candidates.length) return [0, 0, r.width, r.height];
    const m = 90;
    let x0 = Math.min(...r.candidates.map((c) => c.u)) - m, x1 = Math.max(...r.candidates.map((c) => c.u)) + m;
    let y0 = Math.min(...r.candidates.map((c) => c.v)) - m, y1 = Math.max(...r.candidates.map((c) => c.v)) + m;
    let w = Math.max(x1 - x0, 240), h = Math.max(y1 - y0, 180);
    const aspect = r.width / r.height;
    if (w / h < aspect) w = h * aspect; else h = w / aspect;
    w = Math.min(w, r.width); h = Math.min(h, r.height);
    const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    const x = Math.min(Math.max(cx - w / 2, 0), r.width - w), y = Math.min(Math.max(cy - h / 2, 0), r.height - h);
    return [x, y, w, h];
  }

  function applyView() {
    if (!req) return;
    const vb = viewBox(req);
    const view = $("view");
    view.setAttribute("viewBox", vb.join(" "));
    view.style.aspectRatio = vb[2] + " / " + vb[3];
    $("zoom").hidden = !req.candidates.length;
    $("zoom").firstChild.textContent = zoomed ? "Whole picture " : "Zoom in ";
    closeChooser();
  }

  // Page <-> picture coordinates (also used by the browser tests and the latency benchmark).
  function toImage(clientX, clientY) {
    const view = $("view");
    const pt = view.createSVGPoint();
    pt.x = clientX; pt.y = clientY;
    const p = pt.matrixTransform(view.getScreenCTM().inverse());
    return { u: Math.floor(p.x), v: Math.floor(p.y) };
  }
  function toClient(u, v) {
    const view = $("view");
    const pt = view.createSVGPoint();
    pt.x = u + 0.5; pt.y = v + 0.5;
    const p = pt.matrixTransform(view.getScreenCTM());
    return { x: p.x, y: p.y };
  }
  window.__pickcell.toImage = toImage;
  window.__pickcell.toClient = toClient;

  function render(state) {
    clockOffset = state.server_time - Date.now() / 1000;
    $("me").textContent = state.you;
    showQueue(state.queue);
    const r = state.request;
    req = r;
    closeChooser();
    if (!r) {
      shownId = "";
      $("stage").setAttribute("data-request-id", "");
      $("picture").hidden = true;
      $("zoom").hidden = true;
      $("idle").hidden = false;
      $("cell").textContent = "—";
      $("asked").textContent = "";
      $("reasons").textContent = "";
      $("candidates").textContent = "";
      setButtons();
      return;
    }
    if (r.request_id === shownId) { setButtons(); return; }
    $("cell").textContent = r.cell_id + (r.context.tote_id ? " · " + r.context.tote_id : "");
    const reasons = $("reasons");
    reasons.textContent = "";
    for (const why of (r.reasons.length ? r.reasons : ["(no reason given)"])) {
      const li = document.createElement("li"); li.textContent = why; reasons.appendChild(li);
    }
    listCandidates(r);
    drawOverlay(r);
    const rid = r.request_id;
    const pre = new Image();
    pre.src = r.image_url;
    pre.decode().catch(() => null).then(() => {
      if (!req || req.request_id !== rid) return;
      const img = $("image");
      img.setAttribute("width", r.width);
      img.setAttribute("height", r.height);
      img.setAttribute("href", r.image_url);
      shownId = rid;
      $("idle").hidden = true;
      $("picture").hidden = false;
      applyView();
      $("stage").setAttribute("data-request-id", rid);
      requestAnimationFrame(() => { window.__pickcell.shown[rid] = epochMs(performance.now()); });
      setButtons();
    });
    tick();
  }

  function tick() {
    if (!req) { $("countdown").textContent = "—"; return; }
    const now = Date.now() / 1000 + clockOffset;
    const left = req.deadline - now;
    const cd = $("countdown");
    cd.textContent = left > 0 ? left.toFixed(1) + " s" : "time is up";
    cd.classList.toggle("urgent", left < 5);
    const asked = now - (req.created || req.received_at);
    $("asked").textContent = "asked " + fmtAge(Math.max(0, asked)) + " ago · priority " + req.priority;
  }
  setInterval(tick, 100);

  // ---- taps on the picture ----

  function closeChooser() { pendingChoice = null; $("chooser").hidden = true; }

  $("zoom").addEventListener("click", (ev) => { ev.stopPropagation(); zoomed = !zoomed; applyView(); });
  function openChooser(ev, cupLabel, jawLabel, cupAct, jawAct) {
    pendingChoice = { cup: cupAct, jaw: jawAct };
    $("choose-cup").textContent = cupLabel;
    $("choose-jaw").textContent = jawLabel;
    const ch = $("chooser");
    const rect = $("picture").getBoundingClientRect();
    ch.style.left = Math.min(ev.clientX - rect.left, rect.width - 180) + "px";
    ch.style.top = Math.min(ev.clientY - rect.top, rect.height - 90) + "px";
    ch.hidden = false;
  }

  $("view").addEventListener("click", (ev) => {
    if (!req || busy) return;
    const { u, v } = toImage(ev.clientX, ev.clientY);
    if (u < 0 || v < 0 || u >= req.width || v >= req.height) return;
    const reach = HIT_PX / $("view").getScreenCTM().a; // finger-sized, in picture pixels
    const byDistance = req.candidates
      .map((c) => ({ c, d: Math.hypot(c.u - u, c.v - v) }))
      .sort((a, b) => a.d - b.d);
    const near = byDistance.filter((x) => x.d <= reach);
    if (near.length) {
      // On a candidate: approve it. Candidates of both grippers under the finger: ask which.
      const cup = near.find((x) => x.c.gripper === "suction");
      const jaw = near.find((x) => x.c.gripper !== "suction");
      if (cup && jaw) {
        openChooser(ev, "Cup #" + cup.c.index, "Jaw #" + jaw.c.index,
          (t) => approve(cup.c, t), (t) => approve(jaw.c, t));
        return;
      }
      closeChooser();
      approve(near[0].c, ev.timeStamp);
      return;
    }
    // Elsewhere: pick this spot. The gripper: where the cell offered both grippers nearby (both fit
    // on this item), the person chooses; where it offered one, that one; else the cell chooses.
    const around = byDistance.filter((x) => x.d <= AROUND_PX);
    const kinds = new Set(around.map((x) => x.c.gripper));
    if (kinds.has("suction") && kinds.has("parallel_jaw")) {
      openChooser(ev, "Cup here", "Jaw here",
        (t) => point(u, v, t, "suction"), (t) => point(u, v, t, "parallel_jaw"));
      return;
    }
    closeChooser();
    point(u, v, ev.timeStamp, kinds.size === 1 ? [...kinds][0] : undefined);
  });
  $("choose-cup").addEventListener("click", (ev) => { const act = pendingChoice.cup; closeChooser(); act(ev.timeStamp); });
  $("choose-jaw").addEventListener("click", (ev) => { const act = pendingChoice.jaw; closeChooser(); act(ev.timeStamp); });
  $("choose-cancel").addEventListener("click", closeChooser);
  $("no-safe-pick").addEventListener("click", (ev) => send("no_safe_pick", {}, "no safe pick", ev.timeStamp));
  $("skip").addEventListener("click", (ev) => send("skip", {}, "skip", ev.timeStamp));

  // ---- keys ----

  function commitDigits(t) {
    clearTimeout(digitTimer);
    const n = parseInt(digits, 10);
    digits = "";
    if (!req || Number.isNaN(n)) return;
    const c = req.candidates.find((x) => x.index === n);
    if (c) approve(c, t); else notice("No candidate #" + n + " on this picture.", true);
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || !req || busy) return;
    if (ev.key >= "0" && ev.key <= "9") {
      digits += ev.key;
      const n = parseInt(digits, 10);
      // Approve at once when no other offered number starts with what was typed.
      const longer = req.candidates.some((c) => String(c.index) !== digits && String(c.index).startsWith(digits));
      clearTimeout(digitTimer);
      if (!longer && req.candidates.some((c) => c.index === n)) commitDigits(ev.timeStamp);
      else digitTimer = setTimeout(() => commitDigits(performance.now()), 900);
      ev.preventDefault();
    } else if (ev.key === "Enter" && digits) {
      commitDigits(ev.timeStamp); ev.preventDefault();
    } else if (ev.key === "Escape") {
      digits = ""; closeChooser();
    } else if (ev.key === "z") {
      zoomed = !zoomed; applyView();
    } else if (ev.key === "n") {
      send("no_safe_pick", {}, "no safe pick", ev.timeStamp); ev.preventDefault();
    } else if (ev.key === "s") {
      send("skip", {}, "skip", ev.timeStamp); ev.preventDefault();
    }
  });

  // ---- fleet ----

  function cellText(v, fmt) {
    const td = document.createElement("td");
    if (v === null || v === undefined) { td.textContent = "unknown"; td.className = "muted"; }
    else td.textContent = fmt ? fmt(v) : String(v);
    return td;
  }

  function renderFleet(f) {
    const known = (x) => x !== null && x !== undefined;
    const parts = [];
    if (known(f.queue_waiting)) parts.push(f.queue_waiting + " requests waiting");
    if (known(f.queue_held)) parts.push(f.queue_held + " held by people");
    if (known(f.associates_connected)) parts.push(f.associates_connected + " answering clients connected");
    if (known(f.cells_connected)) parts.push(f.cells_connected + " cells connected");
    $("fleet-summary").textContent = "From the " + f.source + (parts.length ? ": " + parts.join(", ") + "." : ".")
      + " Cells appear here once they ask this console; what the source does not know shows as unknown.";
    const body = $("fleet-rows");
    body.textContent = "";
    if (!f.cells.length) {
      const tr = document.createElement("tr"); const td = document.createElement("td");
      td.colSpan = 8; td.className = "muted"; td.textContent = "no cell has asked this console yet";
      tr.appendChild(td); body.appendChild(tr); return;
    }
    const now = Date.now() / 1000 + clockOffset;
    for (const c of f.cells) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-cell", c.cell_id);
      tr.appendChild(cellText(c.cell_id));
      tr.appendChild(cellText(c.state));
      tr.appendChild(cellText(c.picks_per_hour, (x) => x.toFixed(0)));
      tr.appendChild(cellText(c.assists_waiting));
      tr.appendChild(cellText(c.model_version));
      tr.appendChild(cellText(c.rollout_stage));
      tr.appendChild(cellText(c.last_request_at, (t) => fmtAge(Math.max(0, now - t)) + " ago"));
      tr.appendChild(cellText(c.assists_answered_here));
      body.appendChild(tr);
    }
  }

  function showTab(fleet) {
    $("answer-view").hidden = fleet;
    $("fleet-view").hidden = !fleet;
    $("tab-answer").classList.toggle("active", !fleet);
    $("tab-fleet").classList.toggle("active", fleet);
  }
  $("tab-answer").addEventListener("click", () => showTab(false));
  $("tab-fleet").addEventListener("click", () => showTab(true));

  // ---- sign out, live updates ----

  $("sign-out").addEventListener("click", async () => {
    try { await post("/api/logout", {}); } catch (e) { /* signed out either way */ }
    toLogin();
  });

  let backoff = 500;
  function connect() {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    ws.onopen = () => { backoff = 500; };
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "state") render(msg);
      else if (msg.type === "fleet") renderFleet(msg);
      else if (msg.type === "notice") notice(msg.text, true);
      else if (msg.type === "signed_out") toLogin();
    };
    ws.onclose = (ev) => {
      if (ev.code === 4401 || leaving) { toLogin(); return; }
      notice("Connection lost: reconnecting…", true);
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 8000);
    };
  }
  connect();
})();
