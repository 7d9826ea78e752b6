#!/usr/bin/env bash
# RUSTC_WORKSPACE_WRAPPER for the test build (tests/scripts/test.sh): cargo calls it as
# `clippy_wrapper.sh rustc ARGS...` for the workspace's own crates only, and clippy-driver
# compiles them as rustc would, with clippy's lints on and every warning an error.
# Dependencies are built by plain rustc, so the lint costs no second build of the
# dependency tree (`cargo clippy` would check every dependency again). clippy-driver
# turns MIR optimisation off for the crates it lints; LLVM still optimises them at O3.
exec clippy-driver "$@" -D warnings
