// Synthetic camera and microphone for test participants of the local room.
// Video: I420 frames written into a MediaStreamTrackGenerator. The frame counter uses the project-wide pattern
// convention: the Y plane's top band (rows [0, H/8)) holds 16 equal-width columns, column i = bit (15 - i) of
// (counter mod 65536), luma 235 for 1 and 16 for 0. Below the band a slowly moving luma ramp keeps the encoder busy
// like a real camera would. Audio: a sine tone of a known frequency from an OscillatorNode.
//
// Lip-sync marks (sync=1, off by default): every SYNC_PERIOD_MS of wall-clock time (performance.timeOrigin + now, so
// every page of the machine marks at the same instants) the picture's bottom band (rows [H - H/8, H), away from the
// counter band; compose scales pictures into their cells without letterboxing, so it stays at the bottom of a cell)
// turns bright (luma 235, otherwise 16) for MARK_MS, and the audio carries a MARK_HZ burst over the tone for the same
// MARK_MS. Both media then come from one clock, the page's: video frames are written on a wall-clock frame grid by a
// self-correcting timer (a mark starts on a frame of the grid), and the audio is generated here as AudioData into a
// MediaStreamTrackGenerator in AUDIO_CHUNK_MS chunks on the same wall-clock grid, each written when its first
// sample's time comes, so the chunk that starts the burst leaves with the marked frame (within timer jitter). An
// OscillatorNode scheduled on AudioContext time would leave an unknown render-ahead/output latency between the two
// clocks, which getOutputTimestamp does not describe for a MediaStreamAudioDestinationNode.
// Timestamps: Chromium takes an AudioData's timestamp pushed into a MediaStreamTrackGenerator as its capture time on
// its monotonic clock (base::TimeTicks, CLOCK_MONOTONIC on Linux), while it re-stamps video frames whose timestamps are
// far from that clock; audio stamped from 0 would give receivers' A/V sync no common capture clock for the two. So
// both media are stamped on CLOCK_MONOTONIC: the runner passes ticks = wall clock - CLOCK_MONOTONIC (ms) in the URL.
// (Measured here, the offsets came out alike without it; the fixed chunk size below is what mattered.)
// Each mark is reported as "SBPROBE {event: 'mark_sent', ...}" with the actual write times of the marked frame and of
// the audio chunk that holds the burst's first sample (epoch ms), so the source's own skew is measured too.
"use strict";

(function () {
  const PATTERN_COLUMNS = 16;
  const LUMA_ONE = 235;
  const LUMA_ZERO = 16;
  const CHROMA_NEUTRAL = 128;
  const TONE_GAIN = 0.5;
  const SYNC_PERIOD_MS = 2000;
  const MARK_MS = 100;
  const MARK_HZ = 2500; // away from the test tones (440 to 1000 Hz) and inside G.711's band
  const SYNC_TONE_GAIN = 0.2; // tone and burst of two participants mixed stay below full scale (no clipping)
  const SYNC_MARK_GAIN = 0.2;
  const AUDIO_RATE = 48000;
  const AUDIO_CHUNK_MS = 10;
  const AUDIO_TICK_MS = 5; // a chunk leaves 0 to 5 ms after its first sample's time (plus timer lateness)
  const AUDIO_MAX_BACKLOG_MS = 200; // a page stalled longer than this skips audio rather than bursting it out

  const epochNow = () => performance.timeOrigin + performance.now();
  const TICKS_MS = Number(new URLSearchParams(location.search).get("ticks") || NaN);
  // Capture timestamp (us) of the wall-clock instant epochMs on Chromium's monotonic clock (see above); without the
  // runner's offset, time since the page's start (what the unsynced tracks use).
  const captureUs = (epochMs) =>
    Math.round((Number.isFinite(TICKS_MS) ? epochMs - TICKS_MS : epochMs - performance.timeOrigin) * 1000);
  const report = (record) => console.log("SBPROBE " + JSON.stringify(record));

  function drawPattern(buffer, width, height, counter, mark) {
    const ySize = width * height;
    const band = Math.max(1, Math.floor(height / 8));
    const cell = Math.floor(width / PATTERN_COLUMNS);
    const value = counter % 65536;
    for (let row = 0; row < band; row++) {
      const rowStart = row * width;
      for (let i = 0; i < PATTERN_COLUMNS; i++) {
        const bit = (value >> (PATTERN_COLUMNS - 1 - i)) & 1;
        buffer.fill(bit ? LUMA_ONE : LUMA_ZERO, rowStart + i * cell, rowStart + (i + 1) * cell);
      }
      buffer.fill(LUMA_ZERO, rowStart + PATTERN_COLUMNS * cell, rowStart + width);
    }
    const shift = counter % width;
    // mark === undefined: no mark band at all (sync marks off), the ramp fills the picture as before.
    const rampEnd = mark === undefined ? height : height - band;
    for (let row = band; row < rampEnd; row++) {
      const rowStart = row * width;
      for (let x = 0; x < width; x++) buffer[rowStart + x] = 48 + (((x + shift) * 160) / width) | 0;
    }
    if (mark !== undefined) buffer.fill(mark ? LUMA_ONE : LUMA_ZERO, rampEnd * width, ySize);
    buffer.fill(CHROMA_NEUTRAL, ySize);
  }

  function videoTrack(width, height, fps) {
    const generator = new MediaStreamTrackGenerator({ kind: "video" });
    const writer = generator.writable.getWriter();
    const buffer = new Uint8Array(width * height + 2 * Math.ceil(width / 2) * Math.ceil(height / 2));
    let counter = 0;
    const started = performance.now();
    const timer = setInterval(() => {
      drawPattern(buffer, width, height, counter);
      const frame = new VideoFrame(buffer, {
        format: "I420", codedWidth: width, codedHeight: height,
        timestamp: Math.round((performance.now() - started) * 1000),
      });
      counter += 1;
      writer.write(frame).catch(() => clearInterval(timer));
    }, 1000 / fps);
    generator.addEventListener("ended", () => clearInterval(timer));
    return generator;
  }

  function audioTrack(toneHz) {
    const ctx = new AudioContext({ sampleRate: 48000 });
    const osc = new OscillatorNode(ctx, { type: "sine", frequency: toneHz });
    const gain = new GainNode(ctx, { gain: TONE_GAIN });
    const dest = new MediaStreamAudioDestinationNode(ctx);
    osc.connect(gain).connect(dest);
    osc.start();
    ctx.resume();
    return dest.stream.getAudioTracks()[0];
  }

  // ----- with lip-sync marks ---------------------------------------------------------------------------------
  // Times are kept as integer indices on the wall clock (frame k at k / fps s, sample i at i / AUDIO_RATE s): epoch
  // milliseconds are ~1.8e12, where repeated float additions would drift by more than the tolerances used here.
  // Mark n starts on frame firstMarkFrame(n), the first frame of the grid at or after n * SYNC_PERIOD_MS (exactly
  // that instant when the period holds a whole number of frames, as for any integer fps and a 2 s period).
  function firstMarkFrame(n, fps) {
    return Math.ceil((n * SYNC_PERIOD_MS * fps) / 1000 - 1e-6);
  }

  function markFrames(fps) {
    return Math.max(1, Math.round((MARK_MS * fps) / 1000));
  }

  function syncedVideoTrack(width, height, fps, sent) {
    const generator = new MediaStreamTrackGenerator({ kind: "video" });
    const writer = generator.writable.getWriter();
    const buffer = new Uint8Array(width * height + 2 * Math.ceil(width / 2) * Math.ceil(height / 2));
    const frameMs = 1000 / fps;
    let counter = 0;
    let k = Math.ceil(epochNow() / frameMs); // index of the next frame on the wall-clock grid
    let stopped = false;
    function tick() {
      if (stopped) return;
      const now = epochNow();
      if (now - k * frameMs > frameMs) k = Math.floor(now / frameMs); // stalled: skip frames, like a camera would
      const n = Math.floor((k * 1000) / (fps * SYNC_PERIOD_MS) + 1e-9);
      const k0 = firstMarkFrame(n, fps);
      const marked = k >= k0 && k < k0 + markFrames(fps);
      drawPattern(buffer, width, height, counter, marked);
      const frame = new VideoFrame(buffer, {
        format: "I420", codedWidth: width, codedHeight: height, timestamp: captureUs(k * frameMs),
      });
      const written = epochNow();
      writer.write(frame).catch(() => { stopped = true; });
      if (k === k0) sent(n, k0 * frameMs, "video_ms", written);
      counter += 1;
      k += 1;
      setTimeout(tick, Math.max(0, k * frameMs - epochNow()));
    }
    setTimeout(tick, Math.max(0, k * frameMs - epochNow()));
    generator.addEventListener("ended", () => { stopped = true; });
    return generator;
  }

  function syncedAudioTrack(toneHz, fps, sent) {
    const generator = new MediaStreamTrackGenerator({ kind: "audio" });
    const writer = generator.writable.getWriter();
    const perMs = AUDIO_RATE / 1000;
    const chunk = AUDIO_CHUNK_MS * perMs;
    // Absolute sample index on the wall clock (sample i is at i / perMs), chunks on a grid of whole chunks: a mark
    // starts on a whole 10 ms, so its burst starts a chunk.
    let written = Math.ceil((epochNow() * perMs) / chunk) * chunk;
    let phase = 0;
    const step = (2 * Math.PI * toneHz) / AUDIO_RATE;
    const markStep = (2 * Math.PI * MARK_HZ) / AUDIO_RATE;
    const markSamples = Math.round(MARK_MS * perMs);
    function writeChunk() {
      const samples = new Float32Array(chunk);
      for (let i = 0; i < chunk; i++) {
        samples[i] = SYNC_TONE_GAIN * Math.sin(phase);
        phase += step;
        if (phase > 2 * Math.PI) phase -= 2 * Math.PI;
      }
      // Bursts in sample terms: mark n starts at sample round(start * perMs), the same instant as its frame.
      let onset = null;
      const end = written + chunk;
      const lastMark = Math.floor(end / perMs / SYNC_PERIOD_MS);
      for (let n = lastMark - 1; n <= lastMark; n++) {
        const k0 = firstMarkFrame(n, fps);
        const s0 = Math.round((k0 * AUDIO_RATE) / fps);
        const to = Math.min(s0 + markSamples, end);
        for (let i = Math.max(s0, written); i < to; i++) {
          samples[i - written] += SYNC_MARK_GAIN * Math.sin(markStep * (i - s0));
        }
        if (s0 >= written && s0 < end) onset = { n, start: (k0 * 1000) / fps };
      }
      const data = new AudioData({ format: "f32", sampleRate: AUDIO_RATE, numberOfChannels: 1, numberOfFrames: chunk,
        timestamp: captureUs(written / perMs), data: samples });
      written = end;
      const at = epochNow();
      writer.write(data).catch(() => clearInterval(timer));
      if (onset) sent(onset.n, onset.start, "audio_ms", at);
    }
    // Chunks of one fixed size: Chromium reconfigures the track's sinks on every change of an AudioData's frame
    // count, and a stream of varying sizes loses samples there (the receivers then conceal ~40 % of the audio).
    // A chunk is written when the time of its first sample has come, as video frames are: the burst then leaves
    // with the marked frame (a microphone would deliver it one chunk later, a constant that only shifts offsets).
    const timer = setInterval(() => {
      const now = epochNow() * perMs;
      if (now - written > AUDIO_MAX_BACKLOG_MS * perMs) written = Math.floor(now / chunk) * chunk;
      while (written <= now) writeChunk();
    }, AUDIO_TICK_MS);
    generator.addEventListener("ended", () => clearInterval(timer));
    return generator;
  }

  function createSynced({ width, height, fps, toneHz }) {
    const marks = new Map(); // n -> {nominal_ms, video_ms, audio_ms}
    function sent(n, nominal, key, at) {
      const entry = marks.get(n) || { n, nominal_ms: nominal };
      entry[key] = at;
      marks.set(n, entry);
      if (entry.video_ms !== undefined && entry.audio_ms !== undefined) {
        marks.delete(n);
        report({ event: "mark_sent", ...entry });
      }
      for (const old of marks.keys()) if (old < n - 2) marks.delete(old); // one side never came (a stall)
    }
    return new MediaStream([syncedAudioTrack(toneHz, fps, sent), syncedVideoTrack(width, height, fps, sent)]);
  }

  window.SyntheticMedia = {
    drawPattern,
    SYNC_PERIOD_MS,
    MARK_MS,
    MARK_HZ,
    create({ width, height, fps, toneHz }) {
      // The page (room.js) knows nothing of marks: the URL parameter switches them on here.
      if (new URLSearchParams(location.search).get("sync") === "1") return createSynced({ width, height, fps, toneHz });
      return new MediaStream([audioTrack(toneHz), videoTrack(width, height, fps)]);
    },
  };
})();
