// The node agent's dashboard: follows a running build's console log and refreshes the builds
// list while builds are active. Text is only ever added as text (textContent).
"use strict";

const TERMINAL = ["succeeded", "failed", "timed_out", "cancelled"];

async function followLog(pre) {
  let offset = Number(pre.dataset.offset);
  let state = pre.dataset.state;
  const stick = document.getElementById("log-stick");
  pre.scrollTop = pre.scrollHeight;
  while (!TERMINAL.includes(state)) {
    let response;
    try {
      // The server holds the request until there is output or a few seconds passed.
      const url = new URL(pre.dataset.src, location.href);
      url.searchParams.set("offset", offset);
      response = await fetch(url, { cache: "no-store" });
    } catch (e) {
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    if (response.status === 401) {
      location.reload(); // the session ended: the login page
      return;
    }
    if (!response.ok) {
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    const text = await response.text();
    offset = Number(response.headers.get("X-Log-Offset") || offset);
    state = response.headers.get("X-Build-State") || state;
    if (text) {
      const chunk = document.createElement("span");
      chunk.className = "new"; // output that arrived while watching, highlighted
      chunk.textContent = text;
      pre.append(chunk);
      if (!stick || stick.checked) pre.scrollTop = pre.scrollHeight;
    }
  }
  const ended = document.getElementById("log-ended");
  ended.textContent = "The build ended (" + state + "): reload the page for its result.";
  ended.hidden = false;
}

const log = document.getElementById("log");
if (log && !TERMINAL.includes(log.dataset.state)) followLog(log);

const refreshing = document.querySelector("[data-refresh]");
if (refreshing) {
  setTimeout(() => location.reload(), Number(refreshing.dataset.refresh) * 1000);
}
