#!/usr/bin/env python3
"""Serve the demo page (`index.html`) and the npm package from the repository root, with
the models its defaults name beside it:

    python3 tests/scripts/serve_demo.py --gguf PATH [--host 127.0.0.1] [--port 8080]

- `/models/SmolLM2-135M-Instruct.Q4_1.gguf` is the GGUF at `--gguf` (the page's default text
  model); the tiny SmolVLM2 test folder (the default video model) is in the repository.
- Every answer carries `Cross-Origin-Opener-Policy: same-origin` and
  `Cross-Origin-Embedder-Policy: require-corp`, so the page is cross-origin isolated
  (SharedArrayBuffer, and so threaded wasm, is allowed there); fetches of models from
  other origins still work where those servers allow CORS, as the Hugging Face hub does.
- Folders are answered with an index page of their files, which the runtime reads to
  learn which optional files a model folder has (no 404 for the absent ones).

`tests/scripts/serve_demo.sh` builds the package and fetches the model first.
"""
import argparse, functools, http.server, os, sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GGUF_URL = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".js": "text/javascript", ".mjs": "text/javascript", ".gguf": "application/octet-stream",
                      ".safetensors": "application/octet-stream", ".json": "application/json"}

    def __init__(self, *args, gguf, **kwargs):
        self.gguf = gguf
        super().__init__(*args, directory=ROOT, **kwargs)

    def translate_path(self, path):
        if path.split("?", 1)[0] == GGUF_URL:
            return self.gguf
        return super().translate_path(path)

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    quiet = False

    def handle_error(self, request, client_address):
        # A page that stops reading (a cancelled fetch, a closed tab) is not a server error.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct Q4_1 (tests/scripts/fetch_smollm2.sh)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    ap.add_argument("--quiet", action="store_true", help="no request log")
    a = ap.parse_args()
    if not os.path.isfile(a.gguf):
        sys.exit(f"serve_demo: --gguf {a.gguf}: no such file (tests/scripts/fetch_smollm2.sh fetches it)")
    if not os.path.isfile(os.path.join(ROOT, "web", "pkg", "vidllm_web_bg.wasm")):
        sys.exit("serve_demo: web/pkg is not built (bash web/build.sh, or run tests/scripts/serve_demo.sh)")
    server = Server((a.host, a.port), functools.partial(Handler, gguf=os.path.abspath(a.gguf)))
    server.quiet = a.quiet
    print(f"vidllm demo: http://{a.host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
