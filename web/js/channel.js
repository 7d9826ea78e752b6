// Callback pushes -> async iterator pulls: how streamed pieces reach `for await`, in the
// page (from the wasm runtime) and from a worker (from its messages).

/** `push(v)` items, `close(err?)` at the end; iterate with `for await`. */
export function channel() {
  const items = [];
  let wake = null;
  let closed = false;
  let failure = null;
  return {
    push(v) { items.push(v); wake?.(); },
    close(err) { closed = true; failure = err ?? null; wake?.(); },
    async *[Symbol.asyncIterator]() {
      for (;;) {
        if (items.length) { yield items.shift(); continue; }
        if (closed) { if (failure) throw failure; return; }
        await new Promise((r) => (wake = r));
        wake = null;
      }
    },
  };
}

/**
 * A request queued behind `after` (a promise): `work(push)` runs once `after` settles, its
 * pushes stream through a new channel, which closes when `work` settles (a failure goes
 * through `onError` first). Returns the channel, and the promise the next request waits
 * on (settled either way, never rejected).
 */
export function queued(after, work, onError = (e) => e) {
  const ch = channel();
  const job = after.then(() => work((v) => ch.push(v)));
  job.then(() => ch.close(), (e) => ch.close(onError(e)));
  return [ch, job.then(() => {}, () => {})];
}
