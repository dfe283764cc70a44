// sipbridge relay: a SharedWorker that owns the WebSockets to the Python stage.
// Why a SharedWorker: Playwright reports every WebSocket frame of a page or a dedicated worker to its driver,
// payload included (CDP Network.webSocketFrame*), which for raw video means base64-encoding ~14 MB/s through
// Node and Python. A shared worker's sockets are not instrumented, so media crosses only the socket itself.
// Clients: the page (its own SharedWorker port) and the capture worker (a MessageChannel port the page hands
// over). Each client gets its own WebSocket. Client -> relay messages:
//   {t: "attach", wsUrl, maxBacklogBytes, statsIntervalMs, port?}  (first message; port: serve that port instead)
//   a string (JSON control, never dropped) or {b: ArrayBuffer, lim: bytes, k: track key} (binary, dropped and
//   counted when the socket's unsent backlog exceeds lim; the client hears {t: "dropped", k}).
// Relay -> client: strings and ArrayBuffers from Python as they arrive; {t: "closed"} when the socket closes.
"use strict";

function serve(port, cfg) {
  const drops = {};
  let reported = {};
  const pending = [];
  const ws = new WebSocket(cfg.wsUrl);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { for (const m of pending.splice(0)) ws.send(m); };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") port.postMessage(ev.data);
    else port.postMessage(ev.data, [ev.data]);
  };
  ws.onclose = () => port.postMessage({ t: "closed" });
  port.onmessage = (ev) => {
    const d = ev.data;
    if (d && d.t === "attach") {
      serve(d.port, d);
      return;
    }
    if (typeof d === "string") {
      if (ws.readyState === WebSocket.OPEN) ws.send(d);
      else if (ws.readyState === WebSocket.CONNECTING) pending.push(d);
      return;
    }
    if (ws.readyState !== WebSocket.OPEN) {
      drops.socket_not_open = (drops.socket_not_open || 0) + 1;
    } else if (ws.bufferedAmount > d.lim) {
      drops.page_backlog = (drops.page_backlog || 0) + 1;
      port.postMessage({ t: "dropped", k: d.k });
    } else {
      ws.send(d.b);
    }
  };
  setInterval(() => {
    const delta = {};
    let any = false;
    for (const [reason, count] of Object.entries(drops)) {
      const n = count - (reported[reason] || 0);
      if (n > 0) { delta[reason] = n; any = true; }
    }
    reported = { ...drops };
    if (any && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ t: "drops", drops: delta }));
  }, cfg.statsIntervalMs);
}

self.onconnect = (event) => {
  const port = event.ports[0];
  port.onmessage = (ev) => {
    if (ev.data && ev.data.t === "attach") serve(ev.data.port || port, ev.data);
  };
};
