//! `vidllm-native`: run vidllm models from the command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vidllm_native::{ask, batch, bench, chat, frames, inspect, quiet_headless_probe, serve, watch};

#[derive(Parser)]
#[command(name = "vidllm-native", version, about = "Portable video-LLM runtime (native)")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt, streaming tokens to stdout.
    Chat(chat::ChatArgs),
    /// Answer a question about a video or images (a video-language model folder, or a GGUF + mmproj pair).
    Ask(ask::AskArgs),
    /// Show (and dump) the frames a sampling policy picks from a video.
    ///
    /// Frame k is the k-th picture the decoder presents, in display order, as PyAV and
    /// `ffmpeg -fps_mode passthrough` number them, whatever the container's timestamps
    /// (B-frames, edit lists, an offset start). Fixed-count policies (hf, linspace, pllava,
    /// smolvlm) pick by that index; `fps` picks by time, so it follows a variable frame rate.
    /// A rotation tag is applied (frames come out upright; the JSON says by how much).
    /// A stream without timestamps, or whose timestamps repeat or disagree with the
    /// decoder's order, is read from the start in decode order; a packet cut short by the
    /// end of a truncated file is not a frame.
    Frames(frames::FramesArgs),
    /// Print the token ids of a text.
    Tokenize(inspect::TokenizeArgs),
    /// Print the top next-token logits after every prompt position (teacher forcing).
    Logits(inspect::LogitsArgs),
    /// Measure prefill and decode speed, like llama-bench.
    Bench(bench::BenchArgs),
    /// Serve an OpenAI-compatible HTTP API (chat completions, streamed or whole, with
    /// `image_url` and `video_url` parts), decoding `--parallel` requests together.
    Serve(serve::ServeArgs),
    /// Answer a JSONL file of jobs (video, question, options), appending one result line
    /// per job; a rerun skips the jobs already answered.
    Batch(batch::BatchArgs),
    /// Answer questions about a live video (a pipe, `-` for stdin, a growing file with
    /// `--follow`, a capture device) from a rolling window of its newest frames, each
    /// frame encoded once as it arrives; questions come a line at a time.
    Watch(watch::WatchArgs),
}

/// glibc hands a freed block of 128 KiB or more back to the kernel (raising that bound
/// only as it sees such blocks freed), and trims the heap's free top past twice that. So
/// the fresh tensors of an encode and a prefill (a few MiB to 20 MiB each, one per op)
/// came back as zeroed pages, a page fault per 4 KiB: a fifth of a Video-LLaVA tower's
/// time and 40% of the video's decode. Blocks up to 32 MiB (glibc's ceiling for the
/// bound) now come from the heap, which keeps up to 1 GiB of freed memory for reuse: the
/// process's resident size stays near its peak, as with jemalloc or mimalloc.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; no allocation is live across it
    // that depends on them.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    quiet_headless_probe();
    // The main thread is one of the CPU backend's workers: a parallel product then starts
    // on this thread at once while the others join, instead of handing every product to the
    // pool and sleeping until it is done (two context switches per product, which cost
    // more than the small products of a decode step).
    if let Err(e) = rayon::ThreadPoolBuilder::new().use_current_thread().build_global() {
        eprintln!("warning: the thread pool was already set up: {e}");
    }
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Chat(a) => chat::run(a),
        Command::Ask(a) => ask::run(a),
        Command::Frames(a) => frames::run(a),
        Command::Tokenize(a) => inspect::tokenize(a),
        Command::Logits(a) => inspect::logits(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Batch(a) => batch::run(a),
        Command::Watch(a) => watch::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
