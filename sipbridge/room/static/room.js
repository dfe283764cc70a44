// The sipbridge local room: a small conference page on the Janus VideoRoom plugin (janus.js from Debian's
// libjs-janus-gateway). Every participant publishes camera and microphone and subscribes to every other
// publisher with one subscriber handle each. Query parameters:
//   room (number), name (display name; with autojoin=1 the page joins at once), janus (WebSocket URL of Janus),
//   publish=0 (receive only), codec (video codec the room prefers: h264, vp8 or vp9), w, h, fps (capture size), synthetic=1 (test pattern
//   camera and tone microphone instead of real devices, see synthetic.js), tone (Hz), probe=1 (see probe.js).
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const ROOM_ID = Number(params.get("room") || 1234);
  const VIDEO_CODEC = params.get("codec") || "h264";
  // The room's codec list, preferred first (Janus VideoRoom picks the first one a publisher offers).
  const ROOM_VIDEO_CODECS = { h264: "h264,vp8", vp8: "vp8,h264", vp9: "vp9,vp8,h264" };
  const WIDTH = Number(params.get("w") || 640);
  const HEIGHT = Number(params.get("h") || 480);
  const FPS = Number(params.get("fps") || 30);
  const PUBLISH = params.get("publish") !== "0"; // publish=0: a receive-only participant (a viewer)
  const ROOM_BITRATE_BPS = Number(params.get("bitrate") || 1500000);
  const ERROR_ROOM_EXISTS = 427;

  const statusEl = document.getElementById("status");
  const remotesEl = document.getElementById("remotes");
  const nameInput = document.getElementById("display-name");
  const joinButton = document.getElementById("join-button");
  const leaveButton = document.getElementById("leave-button");
  document.getElementById("room-id").textContent = "#" + ROOM_ID;
  if (params.get("name")) nameInput.value = params.get("name");

  let janus = null;
  let publisher = null;
  let localStream = null;
  const subscribers = new Map(); // feed id -> {handle, display, tile}

  function setStatus(state, text) {
    statusEl.dataset.state = state;
    statusEl.textContent = text || state;
    window.dispatchEvent(new CustomEvent("room-status", { detail: { state, text } }));
  }

  // The Janus URL (a ?janus= override wins) and its API secret, when it has one, from the room server.
  async function janusSettings() {
    const config = await (await fetch("/config.json")).json();
    return { server: params.get("janus") || config.janus, apisecret: config.apisecret || null };
  }

  async function captureLocal() {
    if (!PUBLISH) return new MediaStream();
    if (params.get("synthetic") === "1") {
      return window.SyntheticMedia.create({ width: WIDTH, height: HEIGHT, fps: FPS, toneHz: Number(params.get("tone") || 440) });
    }
    return navigator.mediaDevices.getUserMedia({
      audio: true,
      video: { width: WIDTH, height: HEIGHT, frameRate: FPS },
    });
  }

  function tileFor(feedId, display) {
    const tile = document.createElement("section");
    tile.className = "tile remote";
    tile.dataset.participant = display;
    tile.dataset.feed = String(feedId);
    const label = document.createElement("p");
    label.className = "label";
    label.textContent = display;
    tile.appendChild(label);
    remotesEl.appendChild(tile);
    return tile;
  }

  function subscribe(feedId, display) {
    if (subscribers.has(feedId)) return;
    const entry = { handle: null, display, tile: tileFor(feedId, display) };
    subscribers.set(feedId, entry);
    janus.attach({
      plugin: "janus.plugin.videoroom",
      success(handle) {
        entry.handle = handle;
        handle.send({ message: { request: "join", room: ROOM_ID, ptype: "subscriber", streams: [{ feed: feedId }] } });
      },
      error(err) { setStatus("error", "subscribe failed: " + err); },
      onmessage(msg, jsep) {
        if (jsep) {
          entry.handle.createAnswer({
            jsep,
            tracks: [{ type: "data" }],
            success(answer) { entry.handle.send({ message: { request: "start", room: ROOM_ID }, jsep: answer }); },
            error(err) { setStatus("error", "answer failed: " + err); },
          });
        }
      },
      onremotetrack(track, mid, on) {
        const id = "remote-" + feedId + "-" + mid;
        let el = document.getElementById(id);
        if (!on) {
          if (el) el.remove();
          return;
        }
        if (el) return;
        el = document.createElement(track.kind === "video" ? "video" : "audio");
        el.id = id;
        el.autoplay = true;
        el.playsInline = true;
        el.dataset.participant = display;
        el.srcObject = new MediaStream([track]);
        entry.tile.appendChild(el);
        window.dispatchEvent(new CustomEvent("room-remote-track", { detail: { display, track, element: el } }));
      },
      oncleanup() {},
    });
  }

  function unsubscribe(feedId) {
    const entry = subscribers.get(feedId);
    if (!entry) return;
    subscribers.delete(feedId);
    if (entry.handle) entry.handle.detach();
    entry.tile.remove();
  }

  function onPublishers(list) {
    for (const p of list || []) subscribe(p.id, p.display || String(p.id));
  }

  function publish() {
    const audio = localStream.getAudioTracks()[0];
    const video = localStream.getVideoTracks()[0];
    const tracks = [];
    if (audio) tracks.push({ type: "audio", capture: audio, recv: false });
    if (video) tracks.push({ type: "video", capture: video, recv: false });
    // Extra video tracks (a bot that publishes several streams) go out as further m-lines.
    for (const extra of localStream.getVideoTracks().slice(1)) tracks.push({ type: "video", capture: extra, recv: false });
    publisher.createOffer({
      tracks,
      success(jsep) {
        publisher.send({ message: { request: "publish", audio: !!audio, video: !!video }, jsep });
      },
      error(err) { setStatus("error", "offer failed: " + err); },
    });
  }

  function onPublisherMessage(msg, jsep) {
    const event = msg.videoroom;
    if (event === "joined") {
      onPublishers(msg.publishers);
      if (!PUBLISH) {
        setStatus("joined", "watching room " + ROOM_ID);
      } else {
        setStatus("joining", "publishing as " + msg.id);
        publish();
      }
    } else if (event === "event") {
      if (msg.publishers) onPublishers(msg.publishers);
      const gone = msg.unpublished || msg.leaving;
      if (gone && gone !== "ok") unsubscribe(gone);
      // "leaving: ok" addressed to us: the room dropped us (kicked or destroyed).
      if (msg.leaving === "ok") { leave(); setStatus("left", "dropped by the room: " + (msg.reason || "unknown")); }
      if (msg.error_code) setStatus("error", msg.error);
      if (msg.configured === "ok") setStatus("joined", "joined room " + ROOM_ID);
    }
    if (jsep) publisher.handleRemoteJsep({ jsep });
  }

  function ensureRoomThenJoin(display) {
    const create = {
      request: "create", room: ROOM_ID, publishers: 16, bitrate: ROOM_BITRATE_BPS,
      videocodec: ROOM_VIDEO_CODECS[VIDEO_CODEC] || ROOM_VIDEO_CODECS.h264, audiocodec: "opus", fir_freq: 5,
    };
    publisher.send({
      message: create,
      success(result) {
        if (result && result.error_code && result.error_code !== ERROR_ROOM_EXISTS) {
          setStatus("error", result.error);
          return;
        }
        publisher.send({ message: { request: "join", room: ROOM_ID, ptype: "publisher", display } });
      },
    });
  }

  async function join(display) {
    joinButton.disabled = true;
    setStatus("joining");
    try {
      localStream = await captureLocal();
      document.getElementById("local-video").srcObject = localStream;
      const { server, apisecret } = await janusSettings();
      await new Promise((resolve) => Janus.init({ debug: false, callback: resolve }));
      janus = new Janus({
        server,
        apisecret,
        success() {
          janus.attach({
            plugin: "janus.plugin.videoroom",
            success(handle) {
              publisher = handle;
              leaveButton.disabled = false;
              ensureRoomThenJoin(display);
            },
            error(err) { setStatus("error", "attach failed: " + err); },
            onmessage: onPublisherMessage,
            webrtcState(up) { if (!up) setStatus("error", "publisher connection down"); },
          });
        },
        error(err) { setStatus("error", "janus: " + err); },
        destroyed() { setStatus("left"); },
      });
    } catch (err) {
      setStatus("error", String(err));
      joinButton.disabled = false;
    }
  }

  function leave() {
    for (const feedId of [...subscribers.keys()]) unsubscribe(feedId);
    if (janus) janus.destroy();
    if (localStream) for (const t of localStream.getTracks()) t.stop();
    leaveButton.disabled = true;
    setStatus("left");
  }

  document.getElementById("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    join(nameInput.value || "guest");
  });
  leaveButton.addEventListener("click", leave);
  window.room = { join, leave, subscribers };
  if (params.get("autojoin") === "1") join(nameInput.value || "guest");
})();
