// sipbridge relay: a SharedWorker that owns the WebSockets to the Python stage.
// Why a SharedWorker: Playwright reports every WebSocket frame of a page or a dedicated worker to its driver,
// payload included (CDP Network.webSocketFrame*), which for raw video means base64-encoding ~14 MB/s through
// Node and Python. A shared worker's sockets are not instrumented, so media crosses only the socket itself.
// Clients: the page (its own SharedWorker port) and the capture worker (a MessageChannel port the page hands
// over). Each client gets its own WebSocket. Client -> relay messages:
//   {t: "attach", wsUrl, maxBacklogBytes, maxLagMs, statsIntervalMs, port?}  (first message; port: serve that
//   port instead)
//   a string (JSON control, never dropped) or {b: ArrayBuffer, lim: bytes, k: track key} (binary, dropped and
//   counted when the socket's unsent backlog exceeds lim, or when Python has not read what was sent maxLagMs
//   ago; the client hears {t: "dropped", k}).
// Relay -> client: strings and ArrayBuffers from Python as they arrive; {t: "closed"} when the socket closes.
// An "attach" on a port already served (a new stage took over the page: its new wsUrl) replaces that port's socket.
// Python -> relay only: {"t":"rx","n":N}, the binary messages it has read from this socket so far.
//
// Why a time bound: bufferedAmount counts only the socket's own queue, not the kernel's buffers behind it, which
// on loopback hold megabytes, minutes of encoded media when Python is starved. Python's acknowledgements say how
// long ago it read; past maxLagMs the relay stops sending until it catches up, so what waits in between is
// bounded in time whatever the byte rate.
"use strict";

const RX_PREFIX = '{"t":"rx"';
// Each served port's current socket, closed when the port is attached again.
const served = new Map();

function serve(port, cfg) {
  const previous = served.get(port);
  if (previous) previous();
  const drops = {};
  let reported = {};
  const pending = [];
  // When each binary message not yet read by Python went out (performance.now() ms), oldest first: sentAt[head..].
  let sentAt = [];
  let head = 0;
  let sentCount = 0;
  const maxLagMs = cfg.maxLagMs > 0 ? cfg.maxLagMs : 0;
  const ws = new WebSocket(cfg.wsUrl);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { for (const m of pending.splice(0)) ws.send(m); };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      if (ev.data.startsWith(RX_PREFIX)) { acknowledged(ev.data); return; }
      port.postMessage(ev.data);
    } else {
      port.postMessage(ev.data, [ev.data]);
    }
  };
  function acknowledged(text) {
    let n;
    try { n = JSON.parse(text).n; } catch (err) { return; }
    if (!Number.isInteger(n)) return;
    // Python has read n of sentCount messages: the unread are the last sentCount - n.
    const unread = Math.max(0, sentCount - n);
    head = Math.max(head, sentAt.length - unread);
    if (head > 1024 && head * 2 > sentAt.length) { sentAt = sentAt.slice(head); head = 0; }
  }
  function lagMs() {
    return head < sentAt.length ? performance.now() - sentAt[head] : 0;
  }
  ws.onclose = () => {
    clearInterval(timer);
    if (served.get(port) === stop) {
      served.delete(port);
      port.postMessage({ t: "closed" });
    }
  };
  port.onmessage = (ev) => {
    const d = ev.data;
    if (d && d.t === "attach") {
      serve(d.port || port, d);
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
      drops.backlog = (drops.backlog || 0) + 1;  // counted by Python as page_backlog
      port.postMessage({ t: "dropped", k: d.k });
    } else if (maxLagMs && lagMs() > maxLagMs) {
      drops.lag = (drops.lag || 0) + 1;  // page_lag
      port.postMessage({ t: "dropped", k: d.k });
    } else {
      ws.send(d.b);
      sentAt.push(performance.now());
      sentCount += 1;
    }
  };
  const timer = setInterval(() => {
    const delta = {};
    let any = false;
    for (const [reason, count] of Object.entries(drops)) {
      const n = count - (reported[reason] || 0);
      if (n > 0) { delta[reason] = n; any = true; }
    }
    reported = { ...drops };
    if (any && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ t: "drops", drops: delta }));
  }, cfg.statsIntervalMs);
  function stop() {
    clearInterval(timer);
    served.delete(port);
    ws.onclose = null;
    ws.close();
  }
  served.set(port, stop);
}

self.onconnect = (event) => {
  const port = event.ports[0];
  port.onmessage = (ev) => {
    if (ev.data && ev.data.t === "attach") serve(ev.data.port || port, ev.data);
  };
};
