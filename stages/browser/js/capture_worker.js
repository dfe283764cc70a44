// sipbridge capture worker: copies every remote track's media to Python, off the page's main thread, through
// a port to the relay SharedWorker (relay_worker.js) that owns the WebSocket.
// * raw: the page transfers a MediaStreamTrackProcessor readable; video frames go out as I420, audio as s16.
// * encoded: this worker is the RTCRtpScriptTransform of the track's receiver; each encoded frame is copied as
//   received from the room (no decoding here) and then passed on unchanged, so the app still renders it and the
//   receiver does not keep asking for keyframes.
// * passthrough (send): this worker is also the RTCRtpScriptTransform of each sender of a bot camera; it reports the
//   codec Chromium encodes the camera in and, while the page passes the SIP side's frames, sends one of them in
//   place of each frame Chromium encoded (a placeholder picture).
// Messages from the page: {t: "config", port, maxBacklogBytes, statsIntervalMs}, {t: "raw", key, kind, readable},
// {t: "activate", key} (encoded: start copying), {t: "kf", key} (ask the sender for a keyframe), {t: "end", key},
// {t: "pass", slot, on} (a camera starts or stops carrying the SIP side's frames), {t: "au", slot, data, key} (one),
// {t: "sendslot", sid, slot} (a sender now carries that camera; null: none of the bot's).
// To the page: {t: "done", key} when a raw track's stream finished; {t: "sendcodec", slot, mime} when a camera's
// sender encodes in another codec ("layered": more than one stream, kept as Chromium encodes it); {t: "passkf", slot}
// when a camera needs a keyframe from the SIP side (the room asked for one, or frames were lost here).
// Binary messages to Python: [u32 LE header length][JSON header, even length][payload]; headers
//   raw video  {t: "v", k, w, h, ts (us), ct (ms, wall clock)} + I420
//   raw audio  {t: "a", k, sr, ch, n, ts (us), ct} + s16 interleaved
//   encoded    {t: "e", k, codec (MIME type), pt, key (keyframe), ts (RTP timestamp), ct, w, h} + frame bytes
"use strict";

let config = null;
let statsTimer = null;
let relay = null; // MessagePort to the relay
const entries = new Map(); // encoded: track key -> {transformer, kind, active, needKey}
const rawReaders = new Map(); // raw: track key -> ReadableStreamDefaultReader
const drops = {};
let keyframeRequests = 0; // sent to room senders, reported with the drops
let reported = {};
const textEncoder = new TextEncoder();

function drop(reason) {
  drops[reason] = (drops[reason] || 0) + 1;
}

function nowMs() {
  return performance.timeOrigin + performance.now();
}

function sendText(text) {
  relay.postMessage(text);
}

// Binary messages move to the relay without a copy; it drops them (counted) above `limit` bytes of backlog.
function sendBinary(u8, limit, key) {
  relay.postMessage({ b: u8.buffer, lim: limit, k: key }, [u8.buffer]);
}

function packMessage(header, payloadBytes) {
  let json = JSON.stringify(header);
  if ((4 + json.length) % 2) json += " "; // keep payloads 2-byte aligned (ASCII JSON: chars == bytes)
  const head = textEncoder.encode(json);
  const out = new Uint8Array(4 + head.length + payloadBytes);
  new DataView(out.buffer).setUint32(0, head.length, true);
  out.set(head, 4);
  return { out, offset: 4 + head.length };
}

// ----- raw ------------------------------------------------------------------------------------------------------
async function captureVideoRaw(key, reader) {
  for (;;) {
    const { value: frame, done } = await reader.read();
    if (done) return;
    try {
      if (frame.format !== "I420") { drop("format_" + frame.format); continue; }
      const { out, offset } = packMessage({ t: "v", k: key, w: frame.visibleRect.width, h: frame.visibleRect.height,
        ts: frame.timestamp, ct: nowMs() }, frame.allocationSize());
      await frame.copyTo(out.subarray(offset));
      sendBinary(out, config.maxBacklogBytes);
    } catch (err) {
      drop("video_copy_error");
    } finally {
      frame.close();
    }
  }
}

async function captureAudioRaw(key, reader) {
  let planes = [];
  for (;;) {
    const { value: data, done } = await reader.read();
    if (done) return;
    try {
      const n = data.numberOfFrames;
      const ch = data.numberOfChannels;
      const { out, offset } = packMessage({ t: "a", k: key, sr: data.sampleRate, ch, n, ts: data.timestamp,
        ct: nowMs() }, n * ch * 2);
      const s16 = new Int16Array(out.buffer, offset, n * ch);
      if (data.format === "s16") {
        data.copyTo(s16, { planeIndex: 0 });
      } else {
        if (planes.length !== ch || planes[0].length !== n) planes = Array.from({ length: ch }, () => new Float32Array(n));
        for (let c = 0; c < ch; c++) data.copyTo(planes[c], { planeIndex: c, format: "f32-planar" });
        for (let i = 0; i < n; i++) {
          for (let c = 0; c < ch; c++) {
            const v = planes[c][i];
            s16[i * ch + c] = v >= 1 ? 32767 : v <= -1 ? -32768 : Math.round(v * 32767);
          }
        }
      }
      // Audio is small; only a socket far behind drops it.
      sendBinary(out, 4 * config.maxBacklogBytes);
    } catch (err) {
      drop("audio_copy_error");
    } finally {
      data.close();
    }
  }
}

async function captureRaw(key, kind, readable) {
  const reader = readable.getReader();
  rawReaders.set(key, reader);
  try {
    if (kind === "video") await captureVideoRaw(key, reader);
    else await captureAudioRaw(key, reader);
  } catch (err) {
    drop("raw_read_error");
  } finally {
    rawReaders.delete(key);
    self.postMessage({ t: "done", key });
  }
}

// ----- encoded --------------------------------------------------------------------------------------------------
function entryFor(key) {
  if (!entries.has(key)) entries.set(key, { transformer: null, kind: null, active: false, needKey: true });
  return entries.get(key);
}

// Only video receivers take keyframe requests (an audio transformer's promise rejects with InvalidStateError).
function requestKeyframe(entry) {
  const t = entry.transformer;
  if (entry.kind !== "video" || !t || typeof t.sendKeyFrameRequest !== "function") return;
  keyframeRequests += 1;
  t.sendKeyFrameRequest().catch((err) => drop("keyframe_request_failed_" + ((err && err.name) || "error")));
}

function captureEncoded(key, entry, frame) {
  if (!entry.active) return;
  const isVideo = entry.kind === "video";
  const keyframe = isVideo ? frame.type === "key" : true;
  if (isVideo && entry.needKey && !keyframe) { drop("waiting_keyframe"); return; }
  entry.needKey = false;
  const md = frame.getMetadata();
  const { out, offset } = packMessage({ t: "e", k: key, codec: md.mimeType || null, pt: md.payloadType, key: keyframe,
    ts: md.rtpTimestamp !== undefined ? md.rtpTimestamp : frame.timestamp, ct: nowMs(), w: md.width || 0,
    h: md.height || 0 }, frame.data.byteLength);
  out.set(new Uint8Array(frame.data), offset);
  sendBinary(out, config.maxBacklogBytes, key);
}

// ----- passthrough (send) ---------------------------------------------------------------------------------------
// Frames wait here at most this many (a sixth of a second at 30 fps): more means Chromium's encoder is dropping
// placeholders (a paused encoder, a congested link), so the waiting frames are dropped and the camera restarts on the
// SIP side's next keyframe instead of falling further behind.
const PASS_QUEUE_MAX_FRAMES = 5;
const passing = new Map(); // camera index -> whether the page passes the SIP side's frames
const senders = new Set(); // {sid, slot, queue, awaitKey, mime, ssrcs, layered, sent}

function passFrame(entry, frame) {
  if (entry.slot === null) return true; // the sender carries none of the bot's cameras now
  const md = frame.getMetadata();
  const mime = String(md.mimeType || "").toLowerCase();
  entry.ssrcs.add(md.synchronizationSource);
  const reported = entry.ssrcs.size > 1 ? "layered" : mime;
  if (reported !== entry.mime) {
    entry.mime = reported;
    self.postMessage({ t: "sendcodec", slot: entry.slot, mime: reported });
  }
  if (!passing.get(entry.slot) || reported === "layered") return true; // Chromium's own encoding of the camera
  // Chromium encodes a keyframe when the room asks for one (past the first, which a new placeholder size makes).
  if (frame.type === "key" && entry.sent > 0) self.postMessage({ t: "passkf", slot: entry.slot });
  const au = entry.queue.shift();
  if (!au) { drop("pass_no_frame"); return false; }
  frame.data = au;
  entry.sent += 1;
  return true;
}

function queueFrame(msg) {
  for (const entry of senders) {
    if (entry.slot !== msg.slot) continue;
    if (entry.awaitKey && !msg.key) { drop("pass_await_key"); continue; }
    entry.awaitKey = false;
    if (entry.queue.length >= PASS_QUEUE_MAX_FRAMES) {
      drop("pass_behind");
      entry.queue = [];
      entry.awaitKey = !msg.key;
      self.postMessage({ t: "passkf", slot: entry.slot });
      if (entry.awaitKey) continue;
    }
    entry.queue.push(msg.data);
  }
}

function onSendTransform(transformer, slot, sid) {
  const entry = { sid, slot, queue: [], awaitKey: true, mime: null, ssrcs: new Set(), sent: 0 };
  senders.add(entry);
  transformer.readable
    .pipeThrough(new TransformStream({
      transform(frame, controller) {
        let send = true;
        try {
          send = passFrame(entry, frame);
        } catch (err) {
          drop("pass_error");
        }
        if (send) controller.enqueue(frame);
      },
    }))
    .pipeTo(transformer.writable)
    .catch(() => {})
    .finally(() => senders.delete(entry));
}

self.onrtctransform = (event) => {
  const transformer = event.transformer;
  if (transformer.options.role === "send") {
    onSendTransform(transformer, transformer.options.slot, transformer.options.sid);
    return;
  }
  const { key, kind } = transformer.options;
  const entry = entryFor(key);
  entry.transformer = transformer;
  entry.kind = kind;
  transformer.readable
    .pipeThrough(new TransformStream({
      transform(frame, controller) {
        try {
          captureEncoded(key, entry, frame);
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
    relay = msg.port;
    relay.onmessage = (ev) => {
      // The relay dropped an encoded frame: the decoder downstream lost a reference, resynchronise on a keyframe.
      const entry = ev.data && ev.data.t === "dropped" ? entries.get(ev.data.k) : null;
      if (entry && entry.kind === "video" && !entry.needKey) { entry.needKey = true; requestKeyframe(entry); }
    };
    sendText(JSON.stringify({ t: "hello", role: "capture-worker" }));
    if (statsTimer === null) statsTimer = setInterval(() => {
      const delta = {};
      let any = false;
      for (const [reason, count] of Object.entries(drops)) {
        const d = count - (reported[reason] || 0);
        if (d > 0) { delta[reason] = d; any = true; }
      }
      reported = { ...drops };
      if (any || keyframeRequests) sendText(JSON.stringify({ t: "drops", drops: delta, kfreq: keyframeRequests }));
      keyframeRequests = 0;
    }, config.statsIntervalMs);
  } else if (msg.t === "raw") {
    captureRaw(msg.key, msg.kind, msg.readable);
  } else if (msg.t === "activate") {
    const entry = entryFor(msg.key);
    entry.active = true;
    entry.needKey = true;
    requestKeyframe(entry);
  } else if (msg.t === "relinked") {
    // A new stage took over: its decoder starts from nothing, so every captured video restarts on a keyframe.
    for (const entry of entries.values()) {
      if (entry.active && entry.kind === "video") { entry.needKey = true; requestKeyframe(entry); }
    }
  } else if (msg.t === "kf") {
    const entry = entries.get(msg.key);
    if (entry) { entry.needKey = entry.kind === "video"; requestKeyframe(entry); }
  } else if (msg.t === "au") {
    queueFrame(msg);
  } else if (msg.t === "sendslot") {
    for (const entry of senders) {
      if (entry.sid !== msg.sid) continue;
      Object.assign(entry, { slot: msg.slot, queue: [], awaitKey: true, sent: 0, mime: null });
      // A camera already passing: this sender starts with the SIP side's next keyframe.
      if (msg.slot !== null && passing.get(msg.slot)) self.postMessage({ t: "passkf", slot: msg.slot });
    }
  } else if (msg.t === "pass") {
    passing.set(msg.slot, msg.on);
    for (const entry of senders) {
      if (entry.slot === msg.slot) { entry.queue = []; entry.awaitKey = true; entry.sent = 0; }
    }
  } else if (msg.t === "end") {
    const entry = entries.get(msg.key);
    if (entry) entry.active = false;
    const reader = rawReaders.get(msg.key);
    if (reader) reader.cancel().catch(() => {});
  }
};
