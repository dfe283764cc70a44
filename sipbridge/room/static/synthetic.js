// Synthetic camera and microphone for test participants of the local room.
// Video: I420 frames written into a MediaStreamTrackGenerator. The frame counter uses the project-wide pattern
// convention: the Y plane's top band (rows [0, H/8)) holds 16 equal-width columns, column i = bit (15 - i) of
// (counter mod 65536), luma 235 for 1 and 16 for 0. Below the band a slowly moving luma ramp keeps the encoder busy
// like a real camera would. Audio: a sine tone of a known frequency from an OscillatorNode.
"use strict";

(function () {
  const PATTERN_COLUMNS = 16;
  const LUMA_ONE = 235;
  const LUMA_ZERO = 16;
  const CHROMA_NEUTRAL = 128;
  const TONE_GAIN = 0.5;

  function drawPattern(buffer, width, height, counter) {
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
    for (let row = band; row < height; row++) {
      const rowStart = row * width;
      for (let x = 0; x < width; x++) buffer[rowStart + x] = 48 + (((x + shift) * 160) / width) | 0;
    }
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

  window.SyntheticMedia = {
    drawPattern,
    create({ width, height, fps, toneHz }) {
      return new MediaStream([audioTrack(toneHz), videoTrack(width, height, fps)]);
    },
  };
})();
