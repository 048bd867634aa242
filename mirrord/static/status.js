// mirrord status page: keeps the server-rendered page live. No framework, no build step.
//
// - Follows the change feed with a long-poll (GET /v1/changes?since=SEQ&wait=50): when the
//   mirror changes, it re-fetches this page and swaps in its [data-live] parts.
// - Re-fetches calmly for states and ages: every 10 s, every second while a sync runs or was
//   just asked for; not while the tab is hidden.
// - "Sync now" buttons POST to the API.
// - With [http] token set, the token typed into the form is kept in this tab's sessionStorage
//   and sent as "Authorization: Bearer" on every request.
// Text from the server is only ever inserted as server-rendered (escaped) HTML or as textContent.
(function () {
  "use strict";

  var TOKEN_KEY = "mirrord-token";
  var CALM_MS = 10000;
  var BUSY_MS = 1000;
  var WAIT_S = 50;

  var seq = Number(document.body.dataset.seq) || 0;
  var locked = document.body.dataset.locked === "1";
  var busyUntil = 0;
  var timer = null;
  var refreshing = null;
  var following = false;
  var noteTimer = null;

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function headers(extra) {
    var h = extra || {};
    var t = token();
    if (t) { h.Authorization = "Bearer " + t; }
    return h;
  }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  function note(text) {
    var el = document.getElementById("note");
    if (!el) { return; }
    el.textContent = text;
    clearTimeout(noteTimer);
    if (text) { noteTimer = setTimeout(function () { el.textContent = ""; }, 8000); }
  }

  function feed(text, state) {
    var el = document.getElementById("feed");
    if (!el) { return; }
    el.textContent = text;
    el.className = "feed " + (state || "");
  }

  function showLock(message) {
    locked = true;
    var form = document.getElementById("token-form");
    if (form) { form.hidden = false; }
    feed(message || "waiting for the API token", "off");
  }

  function busy() {
    if (Date.now() < busyUntil) { return true; }
    return document.querySelector('tr[data-state="syncing"], tr[data-state="requested"]') !== null;
  }

  // Re-fetch this very page (same query: chosen survey, colours) and swap its live parts in.
  function refresh() {
    if (refreshing) { return refreshing; }
    refreshing = fetch(location.pathname + location.search, {
      headers: headers(), cache: "no-store", credentials: "omit"
    }).then(function (resp) {
      if (!resp.ok) { throw new Error("HTTP " + resp.status); }
      return resp.text();
    }).then(function (text) {
      var doc = new DOMParser().parseFromString(text, "text/html");
      if (doc.body.dataset.locked === "1") {
        showLock(token() ? "the token was not accepted" : "waiting for the API token");
        if (token()) { note("That token was not accepted."); }
        return;
      }
      if (locked) {
        locked = false;
        var form = document.getElementById("token-form");
        if (form) { form.hidden = true; }
      }
      document.querySelectorAll("[data-live]").forEach(function (el) {
        var fresh = doc.getElementById(el.id);
        if (fresh) { el.replaceWith(document.importNode(fresh, true)); }
      });
      document.title = doc.title;
      seq = Math.max(seq, Number(doc.body.dataset.seq) || 0);
    }).catch(function (err) {
      feed("cannot reach the daemon (" + err.message + "); retrying", "off");
    }).finally(function () {
      refreshing = null;
      schedule();
    });
    return refreshing;
  }

  function schedule(ms) {
    clearTimeout(timer);
    if (document.hidden || locked) { return; }
    timer = setTimeout(refresh, ms !== undefined ? ms : (busy() ? BUSY_MS : CALM_MS));
  }

  // The change feed: one long-poll at a time; a change means "re-render".
  async function follow() {
    if (following) { return; }
    following = true;
    var pause = 1000;
    while (!locked) {
      feed("live: following the change feed (seq " + seq + ")", "on");
      try {
        var resp = await fetch("/v1/changes?limit=1&wait=" + WAIT_S + "&since=" + seq, {
          headers: headers(), cache: "no-store", credentials: "omit"
        });
        if (resp.status === 401) { showLock("the token was not accepted"); break; }
        // 410: the mirror was restored from an older copy; its feed starts again from the page.
        if (resp.status === 410) { seq = 0; await refresh(); continue; }
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        var body = await resp.json();
        pause = 1000;
        if (body.changes.length) {
          await sleep(700); // let a page of changes settle, then render once
          var before = seq;
          await refresh();
          if (seq <= before) { seq = body.last_seq; }
        }
      } catch (err) {
        feed("change feed interrupted; retrying in " + Math.round(pause / 1000) + " s", "off");
        await sleep(pause);
        pause = Math.min(pause * 2, 30000);
      }
    }
    following = false;
  }

  async function syncNow(button) {
    var row = button.closest("tr");
    button.disabled = true;
    try {
      var resp = await fetch(button.dataset.sync, {
        method: "POST", headers: headers(), cache: "no-store", credentials: "omit"
      });
      if (resp.status === 202) {
        busyUntil = Date.now() + 15000;
        if (row) {
          row.dataset.state = "requested";
          var pill = row.querySelector(".pill");
          if (pill) { pill.className = "pill p-sync"; pill.textContent = "Sync requested"; }
        }
        note("Sync started.");
      } else if (resp.status === 409) {
        note("A sync of it is already running.");
      } else {
        var text = "HTTP " + resp.status;
        try { text = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
        note("Sync not started: " + text);
      }
    } catch (err) {
      note("Cannot reach the daemon: " + err.message);
    }
    schedule(250);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-sync]");
    if (button && !button.disabled) { syncNow(button); }
  });

  var form = document.getElementById("token-form");
  if (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var input = document.getElementById("token-input");
      try { sessionStorage.setItem(TOKEN_KEY, input.value.trim()); } catch (e) { /* private mode */ }
      input.value = "";
      refresh().then(function () { if (!locked) { follow(); } });
    });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) { refresh(); }
  });

  if (locked) {
    if (token()) {
      refresh().then(function () { if (!locked) { follow(); } });
    } else {
      showLock();
    }
  } else {
    schedule();
    follow();
  }
})();
