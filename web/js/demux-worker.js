// The demuxing half of frame-exact sampling (`demux.js`), in a worker of its own: a
// hostile file can send a demuxer into a loop that never yields (Mediabunny 1.61 on a WebM
// header followed by junk), and here that costs the page nothing. The worker beats every
// 500 ms while it works; the page ends it when the beats stop.
//
// Page -> worker: `{url}`, later `{indices}` (the policy's pick on the timeline sent).
// Worker -> page: `{alive}`, `{timeline: {times, rate}}`, then `{frames: {sources, times,
// indices, frames, span, width, height}}` (the bitmaps transferred) or `{skipped: reason}`.

import * as mb from "../pkg/mediabunny.min.mjs";

setInterval(() => self.postMessage({ alive: true }), 500);

let answer = null;
self.onmessage = async ({ data }) => {
  if (data.indices) {
    answer?.(data.indices);
    return;
  }
  const picked = (times, rate) => new Promise((resolve) => {
    answer = resolve;
    self.postMessage({ timeline: { times, rate } });
  });
  try {
    const out = await readFrames(data.url, picked);
    self.postMessage(out.skipped ? out : { frames: out }, out.skipped ? [] : out.sources);
  } catch (e) {
    self.postMessage({ skipped: `the demuxer failed (${e.message})` });
  }
};

/** The frames `pick` chooses in the file at `url`, or `{skipped: reason}`. */
async function readFrames(url, pick) {
  // No retries: a URL that fails once (a 404, a cross-origin file without CORS) is left to
  // the element, which reports it as it always has.
  const source = new mb.UrlSource(url, { getRetryDelay: () => null });
  const input = new mb.Input({ source, formats: mb.ALL_FORMATS });
  try {
    let track;
    try {
      track = await input.getPrimaryVideoTrack();
    } catch (e) {
      return { skipped: `the file could not be demuxed (${e.message})` };
    }
    if (!track) return { skipped: "the demuxer found no video track" };
    if (!(await track.canDecode().catch(() => false))) return { skipped: `WebCodecs cannot decode its ${track.codec ?? "unknown"} video` };
    const timeline = await displayTimeline(track);
    if (timeline.skipped) return timeline;
    const { starts, times, rate, end } = timeline;
    const indices = Array.from(await pick(times, rate));
    const sources = [];
    try {
      const sink = new mb.VideoSampleSink(track);
      // The sink returns the last frame starting at or before the time asked: asked inside
      // frame k's interval (its middle), that is frame k, or frame k was not decoded.
      const middle = (k) => (k + 1 < starts.length ? (starts[k] + starts[k + 1]) / 2 : (starts[k] + Math.max(end, starts[k])) / 2);
      let i = 0;
      for await (const sample of sink.samplesAtTimestamps(indices.map(middle))) {
        try {
          if (!sample || Math.abs(sample.timestamp - starts[indices[i]]) > 1e-6) {
            throw new Error(`frame ${indices[i]} (${times[indices[i]].toFixed(3)} s) was not decoded${sample ? ` (got ${(sample.timestamp - starts[0]).toFixed(3)} s)` : ""}`);
          }
          sources.push(await upright(sample));
        } finally {
          sample?.close();
        }
        i += 1;
      }
      if (sources.length !== indices.length) throw new Error(`${sources.length} of ${indices.length} frames decoded`);
    } catch (e) {
      sources.forEach((b) => b.close());
      return { skipped: `WebCodecs did not decode it (${e.message})` };
    }
    return { sources, times: indices.map((k) => times[k]), indices, frames: starts.length, span: end - starts[0],
      width: sources[0].width, height: sources[0].height };
  } finally {
    input.dispose();
  }
}

/**
 * A decoded frame as an upright `ImageBitmap`: its YUV planes converted to RGB with the
 * BT.601 matrix (in the stream's range), as swscale converts by default and so as
 * `vidllm-native`, PyAV and decord give frames to models whatever the stream's colour tags
 * say (a `<video>` element uses BT.601 for an untagged SD stream too; WebCodecs tags an
 * untagged stream BT.709, which moves colours by about 8/255 on average); then turned by
 * the file's rotation.
 */
async function upright(sample) {
  let recoloured = null;
  if (sample.format) {
    const planes = new Uint8Array(sample.allocationSize());
    await sample.copyTo(planes);
    recoloured = new mb.VideoSample(planes, {
      format: sample.format, codedWidth: sample.visibleRect.width, codedHeight: sample.visibleRect.height,
      rotation: sample.rotation, flip: sample.flip, timestamp: sample.timestamp, duration: sample.duration,
      colorSpace: { ...sample.colorSpace, matrix: "smpte170m" },
    });
  }
  const frame = recoloured ?? sample;
  try {
    const canvas = new OffscreenCanvas(frame.displayWidth, frame.displayHeight);
    frame.draw(canvas.getContext("2d"), 0, 0);
    return await createImageBitmap(canvas);
  } finally {
    recoloured?.close();
  }
}

/**
 * The display timeline of a track from its packets' metadata (no decoding): presentation
 * timestamps in seconds, ascending, without the packets an edit list places before the
 * start (`starts`); each frame's time from the first (`times`), computed as
 * `vidllm-native` computes it, whole ticks of the track's time base times the base, so a
 * tick that falls halfway between two frames goes the same way in both; the average rate;
 * where the last frame ends.
 */
async function displayTimeline(track) {
  const resolution = await track.getTimeResolution();
  const ticks = [];
  let end = -Infinity;
  for await (const p of new mb.EncodedPacketSink(track).packets(undefined, undefined, { metadataOnly: true })) {
    if (p.timestamp < 0) continue;
    ticks.push(Math.round(p.timestamp * resolution));
    end = Math.max(end, p.timestamp + p.duration);
  }
  if (!ticks.length) return { skipped: "the demuxer found no frames" };
  ticks.sort((a, b) => a - b);
  for (let i = 1; i < ticks.length; i++) {
    if (ticks[i] === ticks[i - 1]) return { skipped: `two frames share the timestamp ${ticks[i] / resolution} s, so the file cannot number its frames` };
  }
  const base = 1 / resolution;
  const starts = ticks.map((t) => t / resolution);
  const times = ticks.map((t) => (t - ticks[0]) * base);
  const span = end - starts[0];
  const rate = span > 0 ? starts.length / span : starts.length > 1 ? (starts.length - 1) / times.at(-1) : 1;
  return { starts, times, rate, end };
}
