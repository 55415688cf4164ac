// The answering page: the held request's picture with its candidates, taps and keys -> answers,
// live updates over a WebSocket, and the fleet view. No framework, no build step.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const HIT_PX = 26; // display pixels around a candidate that count as tapping it (finger-sized)

  let req = null; // the request on screen (server's view), or null
  let shownId = ""; // request id whose picture is on screen
  let clockOffset = 0; // server time - local time, s
  let busy = false; // an answer is on its way
  let digits = "";
  let digitTimer = null;
  let pendingChoice = null; // {cup, jaw} candidates while the chooser is open

  // Timestamps for benchmarks/console_latency.py (epoch ms): when a request became visible, and when
  // the person's click/key for it happened.
  window.__pickcell = { shown: {}, acted: {} };
  const epochMs = (t) => performance.timeOrigin + t;

  // ---- server calls ----

  async function post(path, body) {
    const resp = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    if (resp.status === 401) { window.location.assign("/login"); throw new Error("signed out"); }
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
  const point = (u, v, t) => send("point", { pixel: [u, v] }, "pick at (" + u + ", " + v + ")", t);

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
    svg.setAttribute("viewBox", "0 0 " + r.width + " " + r.height);
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
    const img = $("image");
    const rid = r.request_id;
    img.src = r.image_url;
    img.decode().catch(() => null).then(() => {
      if (!req || req.request_id !== rid) return;
      shownId = rid;
      $("idle").hidden = true;
      $("picture").hidden = false;
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

  function imageCoords(ev) {
    const rect = $("image").getBoundingClientRect();
    const sx = req.width / rect.width, sy = req.height / rect.height;
    const u = Math.floor((ev.clientX - rect.left) * sx), v = Math.floor((ev.clientY - rect.top) * sy);
    return { u, v, sx, sy };
  }

  function closeChooser() { pendingChoice = null; $("chooser").hidden = true; }

  $("picture").addEventListener("click", (ev) => {
    if (!req || busy || ev.target.closest("#chooser")) return;
    const { u, v, sx } = imageCoords(ev);
    if (u < 0 || v < 0 || u >= req.width || v >= req.height) return;
    const reach = HIT_PX * sx;
    const near = req.candidates
      .map((c) => ({ c, d: Math.hypot(c.u - u, c.v - v) }))
      .filter((x) => x.d <= reach)
      .sort((a, b) => a.d - b.d);
    if (!near.length) { closeChooser(); point(u, v, ev.timeStamp); return; }
    const cup = near.find((x) => x.c.gripper === "suction");
    const jaw = near.find((x) => x.c.gripper !== "suction");
    if (cup && jaw) {
      pendingChoice = { cup: cup.c, jaw: jaw.c };
      $("choose-cup").textContent = "Cup #" + cup.c.index;
      $("choose-jaw").textContent = "Jaw #" + jaw.c.index;
      const ch = $("chooser");
      const rect = $("picture").getBoundingClientRect();
      ch.style.left = Math.min(ev.clientX - rect.left, rect.width - 180) + "px";
      ch.style.top = Math.min(ev.clientY - rect.top, rect.height - 90) + "px";
      ch.hidden = false;
      return;
    }
    closeChooser();
    approve(near[0].c, ev.timeStamp);
  });
  $("choose-cup").addEventListener("click", (ev) => { const c = pendingChoice.cup; closeChooser(); approve(c, ev.timeStamp); });
  $("choose-jaw").addEventListener("click", (ev) => { const c = pendingChoice.jaw; closeChooser(); approve(c, ev.timeStamp); });
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
    const n = (x) => (x === null || x === undefined ? "?" : x);
    $("fleet-summary").textContent = "From the " + f.source + ": " + n(f.queue_waiting) + " waiting, "
      + n(f.queue_held) + " held, " + n(f.associates_connected) + " associates and "
      + n(f.cells_connected) + " cells connected.";
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
    window.location.assign("/login");
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
      else if (msg.type === "signed_out") window.location.assign("/login");
    };
    ws.onclose = (ev) => {
      if (ev.code === 4401) { window.location.assign("/login"); return; }
      notice("Connection lost: reconnecting…", true);
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 8000);
    };
  }
  connect();
})();
