// sipbridge encoded-capture worker: the RTCRtpScriptTransform of every remote track in encoded mode.
// Each encoded frame is copied to Python as received from the room (no decoding here) and then passed on
// unchanged, so the app still renders it and the receiver does not keep asking for keyframes.
// Messages from the page: {t: "config", wsUrl, maxBacklogBytes, statsIntervalMs}, {t: "activate", key},
// {t: "kf", key} (ask the sender for a keyframe), {t: "end", key}.
// Binary messages to Python: [u32 LE header length][JSON header, even length][frame bytes], header
// {t: "e", k, codec (MIME type), key (keyframe), ts (RTP timestamp), ct (ms, wall clock), w, h}.
"use strict";

let config = null;
let ws = null;
const entries = new Map(); // track key -> {transformer, kind, active, needKey}
const drops = {};
let reported = {};
const textEncoder = new TextEncoder();

function drop(reason) {
  drops[reason] = (drops[reason] || 0) + 1;
}

function entryFor(key) {
  if (!entries.has(key)) entries.set(key, { transformer: null, kind: null, active: false, needKey: true });
  return entries.get(key);
}

function connect() {
  ws = new WebSocket(config.wsUrl);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify({ t: "hello", role: "encoded-worker" }));
  ws.onclose = () => { ws = null; };
}

function requestKeyframe(entry) {
  const t = entry.transformer;
  if (t && typeof t.sendKeyFrameRequest === "function") t.sendKeyFrameRequest().catch(() => drop("keyframe_request_failed"));
}

function capture(key, entry, frame) {
  if (!entry.active) return;
  const isVideo = entry.kind === "video";
  const keyframe = isVideo ? frame.type === "key" : true;
  if (isVideo && entry.needKey && !keyframe) { drop("waiting_keyframe"); return; }
  if (!ws || ws.readyState !== WebSocket.OPEN) { drop("socket_not_open"); return; }
  if (ws.bufferedAmount > config.maxBacklogBytes) {
    drop("page_backlog");
    // The decoder downstream would miss a reference frame: resynchronise on the next keyframe.
    if (isVideo) { entry.needKey = true; requestKeyframe(entry); }
    return;
  }
  entry.needKey = false;
  const md = frame.getMetadata();
  const header = { t: "e", k: key, codec: md.mimeType || null, pt: md.payloadType, key: keyframe,
    ts: md.rtpTimestamp !== undefined ? md.rtpTimestamp : frame.timestamp,
    ct: performance.timeOrigin + performance.now(), w: md.width || 0, h: md.height || 0 };
  let json = JSON.stringify(header);
  if ((4 + json.length) % 2) json += " ";
  const head = textEncoder.encode(json);
  const out = new Uint8Array(4 + head.length + frame.data.byteLength);
  new DataView(out.buffer).setUint32(0, head.length, true);
  out.set(head, 4);
  out.set(new Uint8Array(frame.data), 4 + head.length);
  ws.send(out);
}

self.onrtctransform = (event) => {
  const transformer = event.transformer;
  const { key, kind } = transformer.options;
  const entry = entryFor(key);
  entry.transformer = transformer;
  entry.kind = kind;
  transformer.readable
    .pipeThrough(new TransformStream({
      transform(frame, controller) {
        try {
          capture(key, entry, frame);
        } catch (err) {
          drop("capture_error");
        }
        controller.enqueue(frame);
      },
    }))
    .pipeTo(transformer.writable)
    .catch(() => {})
    .finally(() => entries.delete(key));
};

self.onmessage = (event) => {
  const msg = event.data;
  if (msg.t === "config") {
    config = msg;
    connect();
    setInterval(() => {
      const delta = {};
      let any = false;
      for (const [reason, count] of Object.entries(drops)) {
        const d = count - (reported[reason] || 0);
        if (d > 0) { delta[reason] = d; any = true; }
      }
      reported = { ...drops };
      if (any && ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ t: "drops", drops: delta }));
    }, config.statsIntervalMs);
  } else if (msg.t === "activate") {
    const entry = entryFor(msg.key);
    entry.active = true;
    entry.needKey = true;
    requestKeyframe(entry);
  } else if (msg.t === "kf") {
    const entry = entries.get(msg.key);
    if (entry) { entry.needKey = entry.kind === "video"; requestKeyframe(entry); }
  } else if (msg.t === "end") {
    const entry = entries.get(msg.key);
    if (entry) entry.active = false;
  }
};
