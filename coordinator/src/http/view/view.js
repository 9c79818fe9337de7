// The web view's only script: while a rollback runs, the server sends its page's live part
// again each time it changes (server-sent events); this swaps it in. The HTML comes from the
// coordinator, escaped there. Without the script the page still shows the rollback as it was.
"use strict";
(function () {
  const live = document.getElementById("live");
  const status = document.getElementById("stream-status");
  if (!live || !live.dataset.stream || !status) {
    return;
  }
  const source = new EventSource(live.dataset.stream);
  source.addEventListener("open", function () {
    status.textContent = "live";
  });
  source.addEventListener("live", function (event) {
    live.innerHTML = event.data;
    status.textContent = "live, updated " + new Date().toLocaleTimeString();
  });
  source.addEventListener("end", function () {
    source.close();
    status.textContent = "ended";
  });
  source.addEventListener("problem", function (event) {
    source.close();
    status.textContent = "stopped: " + event.data + " (reload to try again)";
  });
  source.addEventListener("error", function () {
    // EventSource connects again by itself (the server ends a view after a while), unless the
    // server refused the new connection (signed out, too many views, not the leader).
    if (source.readyState === EventSource.CLOSED) {
      status.textContent = "stopped (reload to try again)";
    } else {
      status.textContent = "reconnecting…";
    }
  });
})();
