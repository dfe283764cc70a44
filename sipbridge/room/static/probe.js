// Probe of what a test participant receives (active with ?probe=1): reads the frame counter from the received
// pixels and estimates the received tone, per remote participant, and reports both as console lines
// "SBPROBE {json}" that the participant runner prints for tests. Only the local room's test pages use it.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  if (params.get("probe") !== "1") return;
  const PATTERN_COLUMNS = 16;
  const REPORT_INTERVAL_MS = 500;
  const TONE_WINDOW_SAMPLES = 9600; // 0.2 s at 48 kHz
  const received = new Map(); // display (or "display#N" for a participant's Nth video) -> {counters, toneHz, frames}
  const videoCount = new Map(); // display -> video tracks seen

  function entryFor(display) {
    if (!received.has(display)) received.set(display, { counters: [], toneHz: null, frames: 0, width: 0, height: 0 });
    return received.get(display);
  }

  function readCounter(y, width, height, stride) {
    const band = Math.max(1, Math.floor(height / 8));
    const cell = Math.floor(width / PATTERN_COLUMNS);
    let value = 0;
    for (let i = 0; i < PATTERN_COLUMNS; i++) {
      let sum = 0;
      let n = 0;
      for (let row = Math.floor(band / 4); row < band - Math.floor(band / 4); row++) {
        for (let x = i * cell + Math.floor(cell / 4); x < (i + 1) * cell - Math.floor(cell / 4); x++) {
          sum += y[row * stride + x];
          n++;
        }
      }
      if (n && sum / n >= 128) value |= 1 << (PATTERN_COLUMNS - 1 - i);
    }
    return value;
  }

  async function readVideo(display, track) {
    const entry = entryFor(display);
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    for (;;) {
      const { value: frame, done } = await reader.read();
      if (done) return;
      try {
        const size = frame.allocationSize();
        const buffer = new Uint8Array(size);
        const layout = await frame.copyTo(buffer);
        entry.width = frame.displayWidth;
        entry.height = frame.displayHeight;
        entry.counters.push(readCounter(buffer.subarray(layout[0].offset), frame.displayWidth, frame.displayHeight,
          layout[0].stride));
        entry.frames++;
      } finally {
        frame.close();
      }
    }
  }

  function estimateTone(samples, rate) {
    // Zero crossings of a clean sine: two per period.
    let crossings = 0;
    for (let i = 1; i < samples.length; i++) if ((samples[i - 1] < 0) !== (samples[i] < 0)) crossings++;
    return (crossings / 2) * rate / samples.length;
  }

  async function readAudio(display, track) {
    const entry = entryFor(display);
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    let window = new Float32Array(TONE_WINDOW_SAMPLES);
    let filled = 0;
    for (;;) {
      const { value: data, done } = await reader.read();
      if (done) return;
      try {
        const n = data.numberOfFrames;
        const plane = new Float32Array(n);
        data.copyTo(plane, { planeIndex: 0, format: "f32-planar" });
        const take = Math.min(n, TONE_WINDOW_SAMPLES - filled);
        window.set(plane.subarray(0, take), filled);
        filled += take;
        if (filled === TONE_WINDOW_SAMPLES) {
          entry.toneHz = estimateTone(window, data.sampleRate);
          window = new Float32Array(TONE_WINDOW_SAMPLES);
          filled = 0;
        }
      } finally {
        data.close();
      }
    }
  }

  window.addEventListener("room-remote-track", (ev) => {
    const { display, track } = ev.detail;
    if (track.kind === "video") {
      const n = (videoCount.get(display) || 0) + 1;
      videoCount.set(display, n);
      readVideo(n === 1 ? display : display + "#" + n, track);
    } else {
      readAudio(display, track);
    }
  });
  window.addEventListener("room-status", (ev) => console.log("SBPROBE " + JSON.stringify({ event: "status", ...ev.detail })));

  setInterval(() => {
    for (const [display, entry] of received) {
      console.log("SBPROBE " + JSON.stringify({
        event: "received", from: display, frames: entry.frames, counters: entry.counters.splice(0),
        tone_hz: entry.toneHz, width: entry.width, height: entry.height,
      }));
    }
  }, REPORT_INTERVAL_MS);
})();
