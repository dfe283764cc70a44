// Probe of what a test participant receives (active with ?probe=1): reads the frame counter from the received
// pixels and estimates the received tone, per remote participant, and reports both as console lines
// "SBPROBE {json}" that the participant runner prints for tests. Only the local room's test pages use it.
// With sync=1 it also finds the lip-sync marks of synthetic.js in what it receives: the video mark's onset (the
// first frame whose bottom band is bright) and the audio mark's onset (the start of the MARK_HZ burst), each as the
// wall-clock time (performance.timeOrigin + now, epoch ms) at which the page received it: a video frame when the
// track processor hands it over, an audio sample at its chunk's hand-over plus its position in the chunk (remote
// audio reaches the processor as the playout pulls it, so this is when it would be heard). Reported in the periodic
// "received" lines as marks_video / marks_audio; the runner pairs them (sipbridge.testing.lipsync).
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  if (params.get("probe") !== "1") return;
  const PATTERN_COLUMNS = 16;
  const REPORT_INTERVAL_MS = 500;
  const TONE_WINDOW_SAMPLES = 9600; // 0.2 s at 48 kHz
  const SYNC = params.get("sync") === "1";
  // Must match synthetic.js and sipbridge/testing/lipsync.py (MARK_* there).
  const MARK_HZ = 2500;
  const MARK_BAND_FRACTION = 8; // the bottom 1/8 of the picture
  const MARK_ENVELOPE_MS = 4; // each of the two moving averages of the burst detector
  const MARK_DETECT_LEVEL = 0.06; // envelope (full scale 1.0) that says "a burst": the burst is sent at 0.2
  const MARK_REFRACTORY_MS = 1000; // one onset per mark (marks are 2 s apart)
  const received = new Map(); // display (or "display#N" for a participant's Nth video) -> {counters, toneHz, frames}
  const videoCount = new Map(); // display -> video tracks seen

  function entryFor(display) {
    if (!received.has(display)) {
      received.set(display, { counters: [], toneHz: null, frames: 0, width: 0, height: 0, marksVideo: [],
        marksAudio: [] });
    }
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

  function markBandBright(y, width, height, stride) {
    // Mean luma of the middle of the bottom band (its central half of rows, 80 % of the width).
    const band = Math.max(1, Math.floor(height / MARK_BAND_FRACTION));
    const top = height - band + Math.floor(band / 4);
    const bottom = Math.max(top + 1, height - Math.floor(band / 4));
    let sum = 0;
    let n = 0;
    for (let row = top; row < bottom; row += 2) {
      for (let x = Math.floor(width / 10); x < width - Math.floor(width / 10); x += 4) {
        sum += y[row * stride + x];
        n++;
      }
    }
    return n > 0 && sum / n >= 128;
  }

  async function readVideo(display, track) {
    const entry = entryFor(display);
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    let wasMarked = true; // a stream that starts inside a mark has no onset to time
    let lastOnset = -Infinity;
    for (;;) {
      const { value: frame, done } = await reader.read();
      if (done) return;
      const arrived = performance.timeOrigin + performance.now();
      try {
        const size = frame.allocationSize();
        const buffer = new Uint8Array(size);
        const layout = await frame.copyTo(buffer);
        entry.width = frame.displayWidth;
        entry.height = frame.displayHeight;
        entry.counters.push(readCounter(buffer.subarray(layout[0].offset), frame.displayWidth, frame.displayHeight,
          layout[0].stride));
        entry.frames++;
        if (SYNC) {
          const marked = markBandBright(buffer.subarray(layout[0].offset), frame.displayWidth, frame.displayHeight,
            layout[0].stride);
          if (marked && !wasMarked && arrived - lastOnset > MARK_REFRACTORY_MS) {
            entry.marksVideo.push(arrived);
            lastOnset = arrived;
          }
          wasMarked = marked;
        }
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

  // Burst detector: the signal shifted down by MARK_HZ (complex), smoothed by two moving averages of L samples
  // (a triangle of 2L - 1), is the burst's envelope; the other tones land >= 1.5 kHz away and are attenuated ~50 dB.
  // An onset is where the envelope reaches half of the burst's plateau, minus the L - 1 samples that the triangle
  // takes to get there from a sharp start. The same detector runs in Python on the SIP capture.
  function markDetector(onOnset) {
    let rate = 0;
    let L = 0;
    let index = 0; // samples seen
    let re1, im1, re2, im2, history, sums, pending, lastOnset;
    const chunks = []; // recent {start, t}: sample index -> arrival time
    function reset(newRate) {
      rate = newRate;
      L = Math.max(1, Math.round((rate * MARK_ENVELOPE_MS) / 1000));
      re1 = new Float64Array(L); im1 = new Float64Array(L); re2 = new Float64Array(L); im2 = new Float64Array(L);
      history = new Float32Array(8 * L);
      sums = [0, 0, 0, 0];
      pending = -1;
      lastOnset = -Infinity;
    }
    function timeOf(sample) {
      for (let i = chunks.length - 1; i >= 0; i--) {
        if (chunks[i].start <= sample) return chunks[i].t + ((sample - chunks[i].start) * 1000) / rate;
      }
      return null;
    }
    return function push(plane, sampleRate, arrived) {
      if (sampleRate !== rate) reset(sampleRate);
      chunks.push({ start: index, t: arrived });
      if (chunks.length > 64) chunks.shift();
      const w = (2 * Math.PI * MARK_HZ) / rate;
      const H = history.length;
      for (let i = 0; i < plane.length; i++, index++) {
        const x = plane[i];
        const slot = index % L;
        const r = x * Math.cos(w * (index % rate)); // (index % rate): a whole number of cycles per second of MARK_HZ
        const q = -x * Math.sin(w * (index % rate));
        sums[0] += r - re1[slot]; re1[slot] = r;
        sums[1] += q - im1[slot]; im1[slot] = q;
        const r2 = sums[0] / L;
        const q2 = sums[1] / L;
        sums[2] += r2 - re2[slot]; re2[slot] = r2;
        sums[3] += q2 - im2[slot]; im2[slot] = q2;
        const envelope = (2 * Math.hypot(sums[2], sums[3])) / L;
        history[index % H] = envelope;
        if (pending < 0 && envelope > MARK_DETECT_LEVEL && ((index - lastOnset) * 1000) / rate > MARK_REFRACTORY_MS) {
          pending = index;
        }
        if (pending >= 0 && index >= pending + 3 * L) {
          let plateau = 0;
          for (let j = pending; j <= index; j++) plateau = Math.max(plateau, history[j % H]);
          let half = pending;
          for (let j = Math.max(0, pending - 2 * L, index - H + 1); j <= index; j++) {
            if (history[j % H] >= plateau / 2) { half = j; break; }
          }
          const onset = half - (L - 1);
          const t = timeOf(onset);
          if (t !== null) onOnset(t);
          lastOnset = onset;
          pending = -1;
        }
      }
    };
  }

  async function readAudio(display, track) {
    const entry = entryFor(display);
    const detect = SYNC ? markDetector((t) => entry.marksAudio.push(t)) : null;
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    let window = new Float32Array(TONE_WINDOW_SAMPLES);
    let filled = 0;
    for (;;) {
      const { value: data, done } = await reader.read();
      if (done) return;
      const arrived = performance.timeOrigin + performance.now();
      try {
        const n = data.numberOfFrames;
        const plane = new Float32Array(n);
        data.copyTo(plane, { planeIndex: 0, format: "f32-planar" });
        if (detect) detect(plane, data.sampleRate, arrived);

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
      const record = {
        event: "received", from: display, frames: entry.frames, counters: entry.counters.splice(0),
        tone_hz: entry.toneHz, width: entry.width, height: entry.height,
      };
      if (SYNC) {
        record.marks_video = entry.marksVideo.splice(0);
        record.marks_audio = entry.marksAudio.splice(0);

      }
      console.log("SBPROBE " + JSON.stringify(record));
    }
  }, REPORT_INTERVAL_MS);
})();
