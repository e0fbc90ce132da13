// Shouhu consoles: keep the page's live parts current without a reload.
// The page is complete without this script; it only listens to the live feed
// (/api/v1/events, authenticated by the session cookie) and, on each change,
// fetches the server-rendered fragments again (data-fragment) and swaps them in.
"use strict";
(function () {
  const parts = Array.from(document.querySelectorAll("[data-fragment]"));
  const status = document.getElementById("live-status");
  if (!parts.length || typeof EventSource === "undefined") return;
  let pending = null;
  function refresh() {
    // Many events arrive together (a step pages several people): one refetch for a burst.
    if (pending) return;
    pending = setTimeout(async function () {
      pending = null;
      for (const part of parts) {
        const before = new Set(Array.from(part.querySelectorAll("[data-incident],[data-task]")).map((e) => e.outerHTML));
        try {
          const answer = await fetch(part.dataset.fragment, { credentials: "same-origin", headers: { "X-Fragment": "1" } });
          if (answer.status === 401) { location.href = "/console/login"; return; }
          if (!answer.ok) continue;
          part.innerHTML = await answer.text();
          for (const item of part.querySelectorAll("[data-incident],[data-task]")) {
            if (!before.has(item.outerHTML)) item.classList.add("fresh");
          }
        } catch (e) { /* the next event or the reconnect refetches */ }
      }
    }, 150);
  }
  const feed = new EventSource("/api/v1/events", { withCredentials: true });
  for (const name of ["incident", "device", "task", "reset"]) feed.addEventListener(name, refresh);
  feed.onopen = function () { document.body.classList.remove("offline"); status.textContent = ""; };
  feed.onerror = function () { document.body.classList.add("offline"); status.textContent = document.documentElement.lang === "en" ? "Connection lost, reconnecting…" : "连接中断，正在重连…"; };
})();
