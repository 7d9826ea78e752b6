#!/usr/bin/env python3
"""Run the workspace's Rust tests one binary at a time and time every test.

`cargo test` on stable Rust cannot say how long each test took, so this builds the test
binaries with `cargo test --no-run` (the same release profile and features as every
other build here, so nothing compiles twice) and runs each one as cargo would (its
package directory as the working directory, single-threaded, output not captured),
asking libtest for JSON events with per-test times. Prints cargo's usual `test result:`
line per binary, then the slowest tests. Exits non-zero if a test or a build failed.

    python3 tests/scripts/cargo_tests.py [--slowest N] [-- TEST-FILTER...]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

EVENT = re.compile(r'(\{ "type": "(?:test|suite)".*\})\s*$')


def test_binaries():
    """(executable, package name, package dir, target name) of every test binary."""
    cmd = ["cargo", "test", "--release", "--workspace", "--lib", "--bins", "--tests", "--no-run",
           "--message-format=json-render-diagnostics"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"cargo_tests: the test build failed ({' '.join(cmd)})")
    bins = []
    for line in out.stdout.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m.get("executable"):
            pkg = m["package_id"]
            name = re.search(r"#([^@]+)@", pkg) or re.search(r"/([^/#]+)#", pkg)
            bins.append((m["executable"], name.group(1) if name else pkg, os.path.dirname(m["manifest_path"]), m["target"]["name"]))
    return bins


def run_binary(exe, pkg, pkg_dir, target, filters, times):
    """Run one test binary; returns (passed, failed). Its output passes through."""
    env = dict(os.environ, RUSTC_BOOTSTRAP="1", CARGO_MANIFEST_DIR=pkg_dir, CARGO_PKG_NAME=pkg)
    args = [exe, "--test-threads=1", "--nocapture", "-Z", "unstable-options", "--format", "json", "--report-time", *filters]
    print(f"     Running {os.path.relpath(exe)} ({pkg}: {target})", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=pkg_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    passed = failed = ignored = 0
    suite_done = False
    for line in proc.stdout:
        m = EVENT.search(line)
        if not m:
            sys.stdout.write(line)
            sys.stdout.flush()
            continue
        before = line[: m.start(1)]
        if before:
            print(before, flush=True)
        e = json.loads(m.group(1))
        if e["type"] == "test" and e["event"] in ("ok", "failed", "ignored"):
            secs = e.get("exec_time", 0.0)
            print(f"test {e['name']} ... {e['event']} ({secs:.2f} s)", flush=True)
            if e["event"] == "failed" and e.get("stdout"):
                print(e["stdout"], flush=True)
            times.append((secs, f"{pkg}::{target}::{e['name']}"))
        elif e["type"] == "suite" and e["event"] in ("ok", "failed"):
            passed, failed, ignored = e["passed"], e["failed"], e["ignored"]
            suite_done = True
    rc = proc.wait()
    if not suite_done or (rc != 0 and failed == 0):
        # A crash (abort, signal) ends the binary before libtest reports.
        failed += 1
        print(f"cargo_tests: {os.path.basename(exe)} exited with {rc} before finishing", flush=True)
    status = "ok" if failed == 0 else "FAILED"
    print(f"test result: {status}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; 0 filtered out; "
          f"finished in {time.monotonic() - started:.2f}s\n", flush=True)
    return passed, failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slowest", type=int, default=12)
    ap.add_argument("filters", nargs="*")
    a = ap.parse_args()
    times = []
    failed = 0
    for exe, pkg, pkg_dir, target in test_binaries():
        failed += run_binary(exe, pkg, pkg_dir, target, a.filters, times)[1]
    times.sort(reverse=True)
    print(f"slowest Rust tests ({sum(t for t, _ in times):.0f} s in all):")
    for secs, name in times[: a.slowest]:
        print(f"  {secs:8.1f} s  {name}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
