// Sign-in: posts {name, password} as JSON with the sign-in form's one-time CSRF token.
"use strict";
(function () {
  const form = document.getElementById("login-form");
  const err = document.getElementById("login-error");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const body = JSON.stringify({
      name: document.getElementById("name").value.trim(),
      password: document.getElementById("password").value,
    });
    let resp;
    try {
      resp = await fetch("/api/login", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body,
        credentials: "same-origin",
      });
    } catch (e) {
      err.textContent = "The console is not reachable.";
      return;
    }
    if (resp.ok) {
      window.location.assign("/");
      return;
    }
    let msg = "Sign-in failed (" + resp.status + ")";
    try { msg = (await resp.json()).error || msg; } catch (e) { /* keep the status text */ }
    err.textContent = msg;
    document.getElementById("password").value = "";
  });
})();
