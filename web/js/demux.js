// Frame-exact sampling of a file-backed <video> (issue 16), as `vidllm-native` numbers frames.
//
// A <video> element can only be seeked by time, and it has no frame count and no frame
// times: a page that seeks it samples a uniform grid derived from the duration, and
// Chromium may show another frame than the one whose interval the time lies in (on an MP4
// whose decode timestamps trail its presentation timestamps it lands on the next keyframe).
// So where the element plays a file the page can fetch, the page reads the file itself:
// - Mediabunny (npm `mediabunny`, MPL-2.0; its unmodified bundle ships in `pkg/`) demuxes it
//   (MP4/MOV with their edit lists, WebM/Matroska, Ogg, MPEG-TS) into packets;
// - the packets' presentation timestamps, sorted, are the display timeline, one entry per
//   displayed frame, as natively (`native/src/video.rs`): frame k is the k-th picture
//   shown, its time is its timestamp less the first's, and a packet an edit list places
//   before the start is not a frame;
// - the sampling policy picks indices on that timeline with the runtime's own Rust rule
//   (`Sampling::indices_on_timeline`: `fps` by time, so it follows a variable rate; the
//   fixed-count policies by displayed-frame index);
// - WebCodecs decodes each picked frame from the keyframe before it, and the frame is
//   drawn upright (the file's rotation applied, as the element and `vidllm-native` do).
// All of that runs in a worker (`demux-worker.js`), off the page's main thread, which a
// hostile file cannot freeze: the worker beats while it works, and a silent one is ended.
// Anything this path cannot do (a live MediaStream, a URL the page may not fetch, a
// container or codec the demuxer or WebCodecs lacks, repeated timestamps, a decode
// failure, a demuxer that stops answering) leaves the element to be seeked as before, and
// says why.

/** How long the demuxing worker may go without a word before the page gives up on it. */
const SILENCE_MS = 5_000;

/** Why this <video> cannot be demuxed by the page, or null. */
function unfit(video) {
  if (typeof VideoDecoder !== "function") return "this browser has no WebCodecs VideoDecoder";
  if (typeof Worker !== "function") return "this context cannot start a worker";
  if (video.srcObject) return "the <video> plays a live source (srcObject), not a file";
  if (!(video.currentSrc || video.src)) return "the <video> has no source URL";
  return null;
}

/**
 * The frames a policy picks in a file-backed `<video>`, read from the file (in a worker,
 * `demux-worker.js`): `{sources, times, indices, frames, duration, width, height, decoder:
 * "webcodecs"}`, or `{skipped: reason}` where the page cannot read this video itself (the
 * caller then seeks the element). `pick(frameTimes, rate)` returns the policy's frame
 * indices on the timeline; its errors (a policy asking more frames than the video has) are
 * the caller's.
 */
export async function demuxedFrames(video, pick) {
  const why = unfit(video);
  if (why) return { skipped: why };
  let worker;
  try {
    worker = new Worker(new URL("./demux-worker.js", import.meta.url), { type: "module" });
  } catch (e) {
    return { skipped: `the demuxing worker could not start (${e.message})` };
  }
  try {
    let silence;
    return await new Promise((resolve, reject) => {
      const listen = () => {
        clearTimeout(silence);
        silence = setTimeout(() => resolve({ skipped: `the demuxer stopped answering for ${SILENCE_MS / 1000} s (a file it cannot parse)` }), SILENCE_MS);
      };
      listen();
      worker.onerror = (e) => resolve({ skipped: `the demuxing worker failed (${e.message ?? "error"})` });
      worker.onmessage = async ({ data }) => {
        listen();
        if (data.timeline) {
          try {
            worker.postMessage({ indices: Array.from(await pick(data.timeline.times, data.timeline.rate)) });
          } catch (e) {
            reject(e);
          }
        } else if (data.skipped) resolve({ skipped: data.skipped });
        else if (data.frames) {
          const f = data.frames;
          // The video's length from its own timeline (first frame to the last one's end), as
          // `vidllm-native` takes it (frames / average rate), not the element's duration.
          resolve({ sources: f.sources, times: f.times, indices: f.indices, frames: f.frames, duration: f.span, width: f.width, height: f.height, decoder: "webcodecs" });
        }
      };
      worker.postMessage({ url: video.currentSrc || video.src });
    }).finally(() => clearTimeout(silence));
  } finally {
    worker.terminate();
  }
}
