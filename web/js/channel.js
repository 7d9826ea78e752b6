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
