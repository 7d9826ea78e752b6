//! `bench`: prefill (pp) and decode (tg) throughput, measured as llama-bench does:
//! pp = one forward over N prompt tokens; tg = N single-token forwards, both from an empty
//! context or, with `--depth D` (llama-bench's `-d`), after D tokens already in the cache
//! (not timed). Each test runs `--reps` times after one warm-up; mean and spread reported.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use vidllm_models::generate::read_row;
use vidllm_models::{KvCache, KvType, Llama, Logits};

use crate::progress::Progress;
use crate::{ModelArgs, runtime};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Tokens already in the context when each test starts (llama-bench's `-d`): decode
    /// at depth is where attention over the cache weighs.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    #[arg(long)]
    pub json: bool,
}

/// Deterministic pseudo-random token ids (what llama-bench feeds too).
fn synthetic_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// A cache with room for `depth + more` tokens, `context` (the first `depth` tokens)
/// already in it.
fn cache_at(m: &Llama, kv: KvType, context: &[u32], more: usize) -> Result<KvCache> {
    let mut cache = KvCache::typed(kv, &m.cfg, context.len() + more + 1, &m.device);
    if !context.is_empty() {
        read_row(m.forward(context, &mut cache, Logits::Last))?;
    }
    Ok(cache)
}

fn prefill_rate(m: &Llama, kv: KvType, context: &[u32], tokens: &[u32]) -> Result<f64> {
    let mut cache = cache_at(m, kv, context, tokens.len())?;
    let t0 = Instant::now();
    read_row(m.forward(tokens, &mut cache, Logits::Last))?;
    Ok(tokens.len() as f64 / t0.elapsed().as_secs_f64())
}

fn decode_rate(m: &Llama, kv: KvType, context: &[u32], n: usize) -> Result<f64> {
    let mut cache = cache_at(m, kv, context, n)?;
    let mut tok = 1u32;
    let t0 = Instant::now();
    for _ in 0..n {
        let row = read_row(m.forward(&[tok], &mut cache, Logits::Last))?;
        tok = vidllm_core::sampler::argmax(&row);
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn stats(xs: &[f64]) -> (f64, f64) {
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len().max(2).saturating_sub(1) as f64;
    (mean, var.sqrt())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let rt = runtime::load(&a.model, Progress::new(a.json))?;
    let m = rt.model.decoder();
    // Refused before any work: a run past the RoPE table would fail midway.
    anyhow::ensure!(a.prompt_tokens >= 1 && a.gen_tokens >= 1, "bench: --prompt-tokens and --gen-tokens must be at least 1");
    let longest = a.depth + a.prompt_tokens.max(a.gen_tokens);
    anyhow::ensure!(
        longest <= m.rope_positions(),
        "bench: --depth {} with {} tokens after it is {longest} positions, over the model's {}",
        a.depth,
        a.prompt_tokens.max(a.gen_tokens),
        m.rope_positions()
    );
    let tokens = synthetic_tokens(a.depth + a.prompt_tokens, m.cfg.vocab_size);
    let (context, prompt) = tokens.split_at(a.depth);
    let kv = a.model.kv.resolve(m.cfg.d_head);
    anyhow::ensure!(kv.fits(m.cfg.d_head), "--kv {kv}: the decoder's heads ({}) are not whole 32-value blocks", m.cfg.d_head);
    let reps = a.reps.max(1);
    // Warm-up: kernel compilation and allocations stay out of the numbers.
    prefill_rate(m, kv, context, prompt)?;
    decode_rate(m, kv, context, 4)?;
    let pp: Vec<f64> = (0..reps).map(|_| prefill_rate(m, kv, context, prompt)).collect::<Result<_>>()?;
    let tg: Vec<f64> = (0..reps).map(|_| decode_rate(m, kv, context, a.gen_tokens)).collect::<Result<_>>()?;
    let ((pp_m, pp_s), (tg_m, tg_s)) = (stats(&pp), stats(&tg));
    if a.json {
        println!(
            "{}",
            json!({
                "device": rt.device_name, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "depth": a.depth, "kv": kv.name(),
                "kv_bytes_per_token": kv.bytes_per_token(&m.cfg),
                "prefill_tok_s": pp_m, "prefill_sd": pp_s, "decode_tok_s": tg_m, "decode_sd": tg_s,
                "weights_device_bytes": m.weights_device_bytes(), "file_bytes": rt.file_bytes,
            })
        );
    } else {
        println!("| model | device | kv | test | t/s |\n|---|---|---|---|---|");
        // llama-bench's names: "pp512 @ d1024".
        let at = if a.depth > 0 { format!(" @ d{}", a.depth) } else { String::new() };
        println!("| {} | {} | {kv} | pp{}{at} | {pp_m:.2} ± {pp_s:.2} |", a.model.model, rt.device_name, a.prompt_tokens);
        println!("| {} | {} | {kv} | tg{}{at} | {tg_m:.2} ± {tg_s:.2} |", a.model.model, rt.device_name, a.gen_tokens);
    }
    Ok(())
}
