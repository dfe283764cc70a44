// sipbridge page hook: injected with one Playwright add_init_script before any page script runs.
// The Python side prepends two constants:
//   SB_CONFIG         {wsUrl, mode: "raw"|"encoded", pageVideo: "shown"|"hidden", maxBacklogBytes, maxLagMs,
//                      identifyTimeoutMs, passthrough (the SIP side's frames sent to the room as they came),
//                      participantAttribute, participantScript, videoTracks, statsIntervalMs}
//   SB_WORKER_SOURCE  the text of capture_worker.js (a Blob worker: raw capture and RTCRtpScriptTransform)
//   SB_RELAY_SOURCE   the text of relay_worker.js (a Blob SharedWorker holding the WebSockets to Python)
// It works with WebRTC apps that know nothing of it:
//   * RTCPeerConnection is replaced by a subclass that sees every remote track. Each track is identified (the
//     participant the page shows it for), announced to Python, and captured in a worker: raw
//     (MediaStreamTrackProcessor, I420 video and s16 audio) or encoded (RTCRtpScriptTransform, frames as received).
//   * navigator.mediaDevices.getUserMedia hands out tracks of MediaStreamTrackGenerators that Python feeds.
//   * passthrough: the senders of those tracks get an RTCRtpScriptTransform that sends the SIP side's encoded frames
//     in place of Chromium's own encoding, where the room takes the SIP side's codec.
// Page <-> Python messages travel over local WebSockets held by a SharedWorker relay. Binary messages
// are [u32 LE header length][UTF-8 JSON header, padded to even length][payload]; text messages are JSON.
"use strict";

(function () {
  if (window.__sipbridgeHook) return;
  const cfg = SB_CONFIG;
  const NativePC = window.RTCPeerConnection;
  if (!NativePC) return;
  const textEncoder = new TextEncoder();
  const textDecoder = new TextDecoder();
  const IDENTIFY_POLL_MS = 100;
  // While a track is muted (no media yet, or a stall) the page may not show it: janus.js, for one, tells its page a
  // track muted for 2.5 s is gone and the page removes its element until media flows again. The identify timeout
  // then counts from the last moment the track was muted, up to this long in all (seen on Janus's demo page at a
  // load average of 57: a feed's audio named by its msid).
  const IDENTIFY_MUTED_MAX_MS = 20000;
  const TRACK_POLL_MS = 500;

  // gum: getUserMedia calls and what they asked for; gumTracks: the tracks handed out (so `sipbridge recipe check`
  // can tell whether what a connection sends is the bot's own camera).
  const hook = { tracks: new Map(), pcs: new Set(), drops: {}, injected: { video: 0, audio: 0 }, ws: null,
    gum: { calls: 0, audio: false, video: false }, gumTracks: new WeakSet(), passed: 0 };
  window.__sipbridgeHook = hook;
  // Nobody looks at a bot's page: with pageVideo "hidden" its video elements are not displayed, so the renderer
  // does not paint them. They keep their srcObject, which is how tracks are identified.
  if (cfg.pageVideo === "hidden") {
    document.addEventListener("DOMContentLoaded", () => {
      const style = document.createElement("style");
      style.textContent = "video { display: none !important; }";
      (document.head || document.documentElement).appendChild(style);
    });
  }
  // Track keys are unique across documents and frames sharing one Python side.
  const DOC_ID = Math.random().toString(36).slice(2, 10);
  let nextTrackKey = 1;
  let nextPcId = 1;

  function nowMs() {
    return performance.timeOrigin + performance.now();
  }

  function drop(reason) {
    hook.drops[reason] = (hook.drops[reason] || 0) + 1;
  }

  // ----- link to Python -------------------------------------------------------------------------------------------
  // The sockets live in a SharedWorker (relay_worker.js) where Playwright does not mirror their frames.
  let relay = null;
  function relayConfig(extra) {
    return { t: "attach", wsUrl: cfg.wsUrl, maxBacklogBytes: cfg.maxBacklogBytes, maxLagMs: cfg.maxLagMs,
      statsIntervalMs: cfg.statsIntervalMs, ...extra };
  }

  // A new stage took over the page (a kept Chromium, stage.py's take-over): the same relay and workers, new
  // sockets to its URL, and everything it must know said again (documents, connections, camera use, tracks).
  hook.relink = function (wsUrl) {
    cfg.wsUrl = wsUrl;
    if (!relay) return false;
    relay.postMessage(relayConfig({}));
    hook.connected = true;
    sendJson({ t: "hello", role: "page", href: location.href, top: window === window.top });
    if (worker) {
      linkWorker();
      worker.postMessage({ t: "relinked" });
    }
    for (const pc of hook.pcs) sendJson({ t: "pc", pc: pc.__sbId, state: pc.connectionState });
    if (hook.gum.calls) sendJson({ t: "gum", audio: hook.gum.audio, video: hook.gum.video });
    for (const info of hook.tracks.values()) if (info.announcement && !info.ended) sendJson(info.announcement);
    videoSlots.forEach((slot, index) => {
      if (slot.sendMime) sendJson({ t: "sendcodec", slot: index, mime: slot.sendMime });
      if (slot.passing) sendJson({ t: "passing", slot: index, on: true });
    });
    return true;
  };

  function connect() {
    const url = URL.createObjectURL(new Blob([SB_RELAY_SOURCE], { type: "text/javascript" }));
    let shared;
    try {
      shared = new SharedWorker(url, { name: "sipbridge-relay-" + DOC_ID });
    } catch (err) {
      // Opaque origins (data: pages, sandboxed frames) may not start shared workers; such a document only
      // hosts the real app in a frame, whose own hook connects.
      return;
    }
    relay = shared.port;
    relay.onmessage = (ev) => {
      if (ev.data && ev.data.t === "closed") { hook.connected = false; return; }
      onPythonMessage(ev.data);
    };
    relay.postMessage(relayConfig({}));
    hook.connected = true;
    sendJson({ t: "hello", role: "page", href: location.href, top: window === window.top });
  }

  function sendJson(obj) {
    if (relay) relay.postMessage(JSON.stringify(obj));
  }

  function wsReady() {
    return relay !== null && hook.connected;
  }

  function parseMessage(buffer) {
    const view = new DataView(buffer);
    const headLength = view.getUint32(0, true);
    const header = JSON.parse(textDecoder.decode(new Uint8Array(buffer, 4, headLength)));
    return { header, offset: 4 + headLength };
  }

  // ----- identity -------------------------------------------------------------------------------------------------
  function elementShowing(track) {
    for (const el of document.querySelectorAll("video,audio")) {
      const src = el.srcObject;
      if (src && typeof src.getTracks === "function" && src.getTracks().includes(track)) return el;
    }
    return null;
  }

  // Who the page shows the track for, and how that was found: "script" (the recipe's participant_script) or
  // "attribute" (participant_attribute on the element or an ancestor); null while the page does not show it.
  function participantOf(track) {
    const el = elementShowing(track);
    if (!el) return null;
    if (cfg.participantScript) {
      try {
        const name = new Function("element", "track", cfg.participantScript)(el, track);
        if (name) return { participant: String(name), identifiedBy: "script" };
      } catch (err) {
        drop("identify_script_error");
      }
    }
    if (cfg.participantAttribute) {
      const holder = el.closest("[" + cfg.participantAttribute + "]");
      const name = holder && holder.getAttribute(cfg.participantAttribute);
      if (name) return { participant: name, identifiedBy: "attribute" };
    }
    return null;
  }

  async function identify(track, streams) {
    const started = performance.now();
    let deadline = started + cfg.identifyTimeoutMs;
    while (performance.now() < deadline) {
      const who = participantOf(track);
      if (who) return who;
      if (track.readyState === "ended") break;
      if (track.muted) {
        deadline = Math.min(Math.max(deadline, performance.now() + cfg.identifyTimeoutMs),
          started + Math.max(IDENTIFY_MUTED_MAX_MS, cfg.identifyTimeoutMs));
      }
      await new Promise((r) => setTimeout(r, IDENTIFY_POLL_MS));
    }
    // The page never showed the track: fall back to the stream id the remote side chose (msid).
    return { participant: (streams[0] && streams[0].id) || track.id, identifiedBy: "msid" };
  }

  // ----- capture --------------------------------------------------------------------------------------------------
  let worker = null;
  function captureWorker() {
    if (!worker) {
      const url = URL.createObjectURL(new Blob([SB_WORKER_SOURCE], { type: "text/javascript" }));
      worker = new Worker(url);
      linkWorker();
      worker.onmessage = (ev) => {
        const info = hook.tracks.get(ev.data.key);
        if (ev.data.t === "done" && info) trackEnded(info, "ended");
        else onWorkerMessage(ev.data);
      };
    }
    return worker;
  }

  // The worker talks to Python through its own relay socket, over a channel the page sets up.
  function linkWorker() {
    const channel = new MessageChannel();
    relay.postMessage(relayConfig({ port: channel.port1 }), [channel.port1]);
    worker.postMessage({ t: "config", port: channel.port2, maxBacklogBytes: cfg.maxBacklogBytes,
      statsIntervalMs: cfg.statsIntervalMs }, [channel.port2]);
  }

  // Raw capture runs in the worker too: the track's MediaStreamTrackProcessor readable is transferred there, so
  // copying frames and talking to Python never competes with the app's main thread.
  function captureRaw(info) {
    const readable = new MediaStreamTrackProcessor({ track: info.track, maxBufferSize: 2 }).readable;
    captureWorker().postMessage({ t: "raw", key: info.key, kind: info.kind, readable }, [readable]);
  }

  function trackEnded(info, reason) {
    if (info.ended) return;
    info.ended = true;
    hook.tracks.delete(info.key);
    if (info.sink) info.sink.srcObject = null;
    if (worker) worker.postMessage({ t: "end", key: info.key });
    sendJson({ t: "ended", k: info.key, reason });
  }

  async function onRemoteTrack(pc, event) {
    const track = event.track;
    const info = { key: DOC_ID + "-" + nextTrackKey++, track, kind: track.kind, pc, transceiver: event.transceiver,
      encoded: cfg.mode === "encoded", ended: false };
    hook.tracks.set(info.key, info);
    if (info.encoded) {
      // Must happen inside the track event, before the first frame is decoded.
      event.receiver.transform = new RTCRtpScriptTransform(captureWorker(), { key: info.key, kind: track.kind });
    }
    if (track.kind === "audio") {
      // A remote audio track delivers data only while a media element plays it; muted, so the bot stays silent.
      const sink = new Audio();
      sink.muted = true;
      sink.srcObject = new MediaStream([track]);
      sink.play().catch(() => {});
      info.sink = sink;
    }
    const who = await identify(track, event.streams);
    if (info.ended) return;
    info.announcement = { t: "track", k: info.key, kind: track.kind, participant: who.participant,
      identified_by: who.identifiedBy, track_id: track.id, mid: event.transceiver ? event.transceiver.mid : null,
      pc: pc.__sbId, stream_ids: event.streams.map((s) => s.id), mode: cfg.mode };
    sendJson(info.announcement);
    if (info.encoded) worker.postMessage({ t: "activate", key: info.key });
    else captureRaw(info);
  }

  // Tracks of a closed connection or a transceiver that stopped receiving never fire "ended": poll for them.
  setInterval(() => {
    for (const info of [...hook.tracks.values()]) {
      const direction = info.transceiver ? info.transceiver.currentDirection : null;
      if (info.track.readyState === "ended") trackEnded(info, "ended");
      else if (info.pc.connectionState === "closed" || info.pc.signalingState === "closed") trackEnded(info, "closed");
      else if (direction === "inactive" || direction === "sendonly" || direction === "stopped") trackEnded(info, direction);
    }
  }, TRACK_POLL_MS);

  class SipbridgePeerConnection extends NativePC {
    constructor(...args) {
      super(...args);
      this.__sbId = nextPcId++;
      hook.pcs.add(this);
      this.addEventListener("track", (ev) => onRemoteTrack(this, ev));
      this.addEventListener("connectionstatechange", () => {
        sendJson({ t: "pc", pc: this.__sbId, state: this.connectionState });
        if (this.connectionState === "closed") hook.pcs.delete(this);
      });
      sendJson({ t: "pc", pc: this.__sbId, state: "new" });
    }

    addTrack(track, ...streams) {
      const sender = super.addTrack(track, ...streams);
      attachSendTransform(sender);
      return sender;
    }

    addTransceiver(trackOrKind, init) {
      const transceiver = super.addTransceiver(trackOrKind, init);
      attachSendTransform(transceiver.sender);
      return transceiver;
    }

    close() {
      for (const info of [...hook.tracks.values()]) if (info.pc === this) trackEnded(info, "closed");
      hook.pcs.delete(this);
      sendJson({ t: "pc", pc: this.__sbId, state: "closed" });
      return super.close();
    }
  }
  window.RTCPeerConnection = SipbridgePeerConnection;
  if (window.webkitRTCPeerConnection) window.webkitRTCPeerConnection = SipbridgePeerConnection;
  if (cfg.passthrough && window.RTCRtpSender) {
    const nativeReplaceTrack = RTCRtpSender.prototype.replaceTrack;
    RTCRtpSender.prototype.replaceTrack = function (track) {
      // A sender that stops carrying a bot camera (the app shares a screen on it) must not get the SIP side's
      // frames: its transform is told the camera it now carries, if any, before the switch.
      if (this.__sbPass && worker) {
        const index = track ? cameraOf.get(track) : undefined;
        worker.postMessage({ t: "sendslot", sid: this.__sbPass, slot: index === undefined ? null : index });
      }
      const done = nativeReplaceTrack.call(this, track);
      done.then(() => attachSendTransform(this), () => {});
      return done;
    };
  }

  // ----- injection: the bot's camera and microphone ---------------------------------------------------------------
  const videoSlots = []; // {generator, writer}
  let audioSlot = null;

  function videoSlot(index) {
    while (videoSlots.length <= index) {
      const generator = new MediaStreamTrackGenerator({ kind: "video" });
      videoSlots.push({ generator, writer: generator.writable.getWriter() });
    }
    return videoSlots[index];
  }

  // The camera each handed-out track shows (clones share the generator's frames, so an app stopping its track does
  // not end the source).
  const cameraOf = new WeakMap();
  function cameraTrack(index) {
    const track = videoSlot(index).generator.clone();
    cameraOf.set(track, index);
    return track;
  }

  // Passthrough: every sender of a bot camera gets a transform in the capture worker, which reports the codec
  // Chromium encodes the camera in ("sendcodec"). Where that is the codec of the SIP side's frames, the camera shows a
  // small grey placeholder per frame (Chromium's encoder then has next to nothing to do, and nothing here decodes)
  // and the worker sends the SIP side's frame in place of each encoded placeholder. Elsewhere, or until a sender
  // reports, the page decodes as below. Layered senders (simulcast) keep Chromium's own encoding.
  const PLACEHOLDER_SIDE_PX = 16;
  const placeholderI420 = new Uint8Array(PLACEHOLDER_SIDE_PX * PLACEHOLDER_SIDE_PX * 3 / 2).fill(128);

  let nextSenderId = 1;
  function attachSendTransform(sender) {
    if (!cfg.passthrough || !sender || !sender.track || sender.__sbPass || !relay) return;
    const index = cameraOf.get(sender.track);
    if (index === undefined) return;
    sender.__sbPass = nextSenderId++;
    try {
      sender.transform = new RTCRtpScriptTransform(captureWorker(), { role: "send", slot: index,
        sid: sender.__sbPass });
    } catch (err) {
      drop("pass_transform_error");
    }
  }

  // The MIME type of the codec a SIP-side frame is in (its WebCodecs codec string), as a sender reports it.
  function mimeOfCodec(codec) {
    const c = String(codec).toLowerCase();
    if (c.startsWith("avc1") || c.startsWith("avc3")) return "video/h264";
    if (c === "vp8") return "video/vp8";
    if (c.startsWith("vp09") || c === "vp9") return "video/vp9";
    if (c.startsWith("av01")) return "video/av1";
    return null;
  }

  function onWorkerMessage(msg) {
    if (msg.t === "sendcodec") {
      const slot = videoSlot(msg.slot);
      slot.sendMime = msg.mime;
      sendJson({ t: "sendcodec", slot: msg.slot, mime: msg.mime });
    } else if (msg.t === "passkf") {
      askKeyframe(msg.slot); // the room asked the bot's camera for a keyframe, or the worker lost its place
    }
  }

  // The camera stops showing decoded pictures and starts carrying the SIP side's frames: it starts on a keyframe.
  function startPassing(index, slot) {
    slot.passing = true;
    slot.awaitKey = true;
    if (slot.decoder && slot.decoder.state !== "closed") slot.decoder.close();
    slot.decoder = null;
    for (const seq of slot.acks || []) sendJson({ t: "ack", seq, slot: index }); // what the closed decoder held
    slot.acks = [];
    worker.postMessage({ t: "pass", slot: index, on: true });
    sendJson({ t: "passing", slot: index, on: true });
  }

  function stopPassing(index, slot) {
    slot.passing = false;
    worker.postMessage({ t: "pass", slot: index, on: false });
    sendJson({ t: "passing", slot: index, on: false });
  }

  function passEncoded(index, slot, header, data, offset, gap) {
    if (!slot.passing) startPassing(index, slot);
    if (waitsForKey(index, slot, header, gap, "inject_gap")) return;
    const frameBytes = data.slice(offset);
    worker.postMessage({ t: "au", slot: index, data: frameBytes, key: !!header.key }, [frameBytes]);
    const frame = new VideoFrame(placeholderI420, { format: "I420", codedWidth: PLACEHOLDER_SIDE_PX,
      codedHeight: PLACEHOLDER_SIDE_PX, timestamp: captureTimestamp(header, "v" + index) });
    slot.writer.write(frame).then(() => {
      hook.injected.video++;
      hook.passed++;
      sendJson({ t: "ack", seq: header.seq, slot: index });
    }, () => drop("inject_video_error"));
  }

  function audioSlotGet() {
    if (!audioSlot) {
      const generator = new MediaStreamTrackGenerator({ kind: "audio" });
      audioSlot = { generator, writer: generator.writable.getWriter() };
    }
    return audioSlot;
  }

  function deviceIndex(constraint) {
    // Apps pick a camera by deviceId; ours are "sipbridge-video-N".
    const wanted = constraint && typeof constraint === "object" ? constraint.deviceId : null;
    const id = wanted && typeof wanted === "object" ? (wanted.exact || wanted.ideal) : wanted;
    const match = typeof id === "string" ? /^sipbridge-video-(\d+)$/.exec(id) : null;
    return match ? Number(match[1]) : null;
  }

  if (navigator.mediaDevices) {
    navigator.mediaDevices.getUserMedia = async function (constraints) {
      // Tell Python which document uses the camera: apps that run the call in an iframe get the injected media.
      sendJson({ t: "gum", audio: !!(constraints && constraints.audio), video: !!(constraints && constraints.video) });
      const tracks = [];
      if (constraints && constraints.audio) tracks.push(audioSlotGet().generator.clone());
      if (constraints && constraints.video) {
        const chosen = deviceIndex(constraints.video);
        // Clones share the generator's frames, so an app stopping its track does not end the source.
        if (chosen !== null) tracks.push(cameraTrack(chosen));
        else for (let i = 0; i < Math.max(1, cfg.videoTracks); i++) tracks.push(cameraTrack(i));
      }
      hook.gum.calls++;
      hook.gum.audio = hook.gum.audio || !!(constraints && constraints.audio);
      hook.gum.video = hook.gum.video || !!(constraints && constraints.video);
      for (const track of tracks) hook.gumTracks.add(track);
      return new MediaStream(tracks);
    };
    navigator.mediaDevices.getDisplayMedia = async function () {
      return new MediaStream([videoSlot(Math.max(1, cfg.videoTracks)).generator.clone()]);
    };
    navigator.mediaDevices.enumerateDevices = async function () {
      const devices = [{ deviceId: "sipbridge-audio-0", kind: "audioinput", label: "sipbridge microphone", groupId: "sipbridge" }];
      for (let i = 0; i < Math.max(1, cfg.videoTracks); i++) {
        devices.push({ deviceId: "sipbridge-video-" + i, kind: "videoinput", label: "sipbridge camera " + i, groupId: "sipbridge" });
      }
      devices.push({ deviceId: "sipbridge-speaker", kind: "audiooutput", label: "sipbridge speaker", groupId: "sipbridge" });
      return devices.map((d) => ({ ...d, toJSON() { return d; } }));
    };
  }

  // Chromium takes an injected frame's timestamp as its capture time: audio and video must share one clock
  // near "now", or the room's receivers misjudge their sync and buffer for it. The bridge's capture time (the
  // SIP RTP receive, wall clock) is that clock, moved onto this page's performance.now() timeline.
  const lastTimestamp = {};

  function captureTimestamp(header, track) {
    const ts = typeof header.ct === "number" ? Math.round((header.ct - performance.timeOrigin) * 1000)
      : Math.round(performance.now() * 1000);
    const prev = lastTimestamp[track];
    const out = prev !== undefined && ts <= prev ? prev + 1 : ts; // never backwards within a track
    lastTimestamp[track] = out;
    return out;
  }

  function onPythonMessage(data) {
    if (typeof data === "string") {
      const msg = JSON.parse(data);
      if (msg.t === "kf" && worker) worker.postMessage({ t: "kf", key: msg.k });
      return;
    }
    const { header, offset } = parseMessage(data);
    const payload = new Uint8Array(data, offset);
    if (header.t === "v") {
      const slot = videoSlot(header.slot || 0);
      const frame = new VideoFrame(payload, { format: "I420", codedWidth: header.w, codedHeight: header.h,
        timestamp: captureTimestamp(header, "v" + (header.slot || 0)) });
      slot.writer.write(frame).then(() => {
        hook.injected.video++;
        sendJson({ t: "ack", seq: header.seq, slot: header.slot || 0 });
      }, () => drop("inject_video_error"));
    } else if (header.t === "ve") {
      injectEncoded(header, data, offset);
    } else if (header.t === "a") {
      const now = performance.now();
      if (lastAudioAt !== null) audioGaps.push(now - lastAudioAt);
      lastAudioAt = now;
      const audio = new AudioData({ format: "s16", sampleRate: header.sr, numberOfChannels: header.ch,
        numberOfFrames: header.n, timestamp: captureTimestamp(header, "a"), data: payload });
      audioSlotGet().writer.write(audio).then(() => { hook.injected.audio++; }, () => drop("inject_audio_error"));
    }
  }

  // Encoded injection: the SIP side's H.264 or VP8 as it came, decoded here (WebCodecs, Chromium's own software
  // decoder) into the camera. Each camera's packets are numbered; a gap or a decoder error makes it wait for a
  // keyframe, which it asks the SIP side for (through Python) at most once a second.
  const reportedCodecs = new Set();
  const MAX_DECODE_QUEUE = 15; // chunks waiting in a decoder (half a second): beyond it, drop to a keyframe

  function injectDecoder(index, codec) {
    const slot = videoSlot(index);
    if (slot.decoder && slot.decoder.state !== "closed" && slot.decoderCodec === codec) return slot;
    if (slot.decoder && slot.decoder.state !== "closed") slot.decoder.close();
    slot.decoderCodec = codec;
    slot.awaitKey = true;
    slot.acks = []; // the ack seq of each chunk in the decoder, in order (a decoder outputs in decode order)
    const decoder = new VideoDecoder({
      output: (frame) => {
        const seq = slot.acks.shift();
        slot.writer.write(frame).then(() => {
          hook.injected.video++;
          if (seq !== undefined) sendJson({ t: "ack", seq, slot: index });
        }, () => drop("inject_video_error"));
      },
      error: (e) => {
        if (slot.decoder === decoder) slot.decoder = null; // the next packet opens a new one, from a keyframe
        if (e && e.name === "NotSupportedError") { unsupported(codec, e); return; }
        drop("inject_decode_error");
        askKeyframe(index);
      },
    });
    decoder.configure({ codec, optimizeForLatency: true });
    slot.decoder = decoder;
    return slot;
  }

  // This Chromium cannot decode the codec (a build without H.264): say so once; every packet is a counted drop.
  function unsupported(codec, e) {
    drop("inject_decoder_unavailable");
    if (!reportedCodecs.has(codec) && wsReady()) {
      reportedCodecs.add(codec);
      sendJson({ t: "injerr", codec, error: String(e) });
    }
  }

  function askKeyframe(index) {
    const slot = videoSlot(index);
    const now = performance.now();
    if (slot.keyAskedAt !== undefined && now - slot.keyAskedAt < 1000) return;
    slot.keyAskedAt = now;
    if (wsReady()) sendJson({ t: "injkf", slot: index });
  }

  // A camera's chain restarts on a keyframe (asked of the SIP side) after a lost packet or another reason to
  // restart; true when this packet is dropped waiting for it.
  function waitsForKey(index, slot, header, restart, reason) {
    if (restart) {
      if (!slot.awaitKey) drop(reason);
      slot.awaitKey = true;
    }
    if (slot.awaitKey && !header.key) {
      drop("inject_await_key");
      askKeyframe(index);
      return true;
    }
    slot.awaitKey = false;
    return false;
  }

  function injectEncoded(header, data, offset) {
    const index = header.slot || 0;
    const camera = videoSlot(index);
    const gap = camera.lastN !== undefined && header.n !== camera.lastN + 1;
    camera.lastN = header.n;
    if (cfg.passthrough && worker) {
      if (camera.sendMime && camera.sendMime === mimeOfCodec(header.codec)) {
        passEncoded(index, camera, header, data, offset, gap);
        return;
      }
      if (camera.passing) stopPassing(index, camera); // the room now takes another codec: decode again
    }
    const payload = new Uint8Array(data, offset);
    if (reportedCodecs.has(String(header.codec))) { drop("inject_decoder_unavailable"); return; }
    let slot;
    try {
      slot = injectDecoder(index, String(header.codec));
    } catch (e) {
      unsupported(String(header.codec), e);
      return;
    }
    const backlog = slot.decoder.decodeQueueSize > MAX_DECODE_QUEUE;
    if (waitsForKey(index, slot, header, gap || backlog, gap ? "inject_gap" : "inject_decode_backlog")) return;
    slot.acks.push(header.seq);
    try {
      slot.decoder.decode(new EncodedVideoChunk({ type: header.key ? "key" : "delta", data: payload,
        timestamp: captureTimestamp(header, "v" + index) }));
    } catch (e) {
      slot.acks.pop();
      drop("inject_decode_error");
      slot.awaitKey = true;
      askKeyframe(index);
    }
  }

  // Gaps between injected audio chunks as they reach the page: a steady 20 ms here is what keeps the room's
  // receivers from growing their jitter buffers for the bot's microphone.
  let lastAudioAt = null;
  let audioGaps = [];

  function gapFigures() {
    if (!audioGaps.length) return null;
    const sorted = audioGaps.sort((a, b) => a - b);
    const at = (q) => Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] * 10) / 10;
    audioGaps = [];
    return { n: sorted.length, p50: at(0.5), p95: at(0.95), max: at(1) };
  }

  // Drop counts travel to Python as deltas, so the stage's figures include what the page lost.
  let reported = {};
  let reportedPassed = 0;
  setInterval(() => {
    const delta = {};
    let any = false;
    for (const [reason, count] of Object.entries(hook.drops)) {
      const d = count - (reported[reason] || 0);
      if (d > 0) { delta[reason] = d; any = true; }
    }
    reported = { ...hook.drops };
    if (any && wsReady()) sendJson({ t: "drops", drops: delta });
    const gaps = gapFigures();
    const passed = hook.passed - reportedPassed;
    reportedPassed = hook.passed;
    if ((gaps || passed) && wsReady()) sendJson({ t: "inject", audio_gap_ms: gaps, passed });
  }, cfg.statsIntervalMs);

  connect();
  // Passthrough: the capture worker starts now, not when the app adds the camera to a connection. In one CI run a
  // send transform made together with its worker reported no frame in 4 s while its sender sent Chromium's own
  // encoding (so passthrough would never have begun); a worker started with the page has seen none of that.
  if (cfg.passthrough && relay) captureWorker();
})();
