//! `chat`: one prompt in, a streamed answer out.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use vidllm_core::GenerateError;
use vidllm_core::sampler::SamplerConfig;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::generate::TokenStream;
use vidllm_models::{GenerateParams, Session};

use crate::{ModelArgs, runtime};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object at the end instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// The prompt's token ids: the chat template (or the raw text), BOS per the model.
pub fn prompt_tokens(tok: &Tokenizer, prompt: &str, raw: bool) -> Result<Vec<u32>> {
    if raw {
        return Ok(tok.encode(prompt, tok.add_bos)?);
    }
    tok.chat_tokens(prompt).context("applying the model's chat template (--raw skips it)")
}

/// Run a stream to its end, writing each piece to `out` as it comes when `echo` is set;
/// returns the token ids.
pub fn drain(stream: &mut TokenStream, out: &mut impl Write, echo: bool) -> Result<Vec<u32>> {
    let mut tokens = Vec::new();
    for piece in stream.by_ref() {
        let piece = piece?;
        tokens.push(piece.id);
        if echo {
            out.write_all(piece.text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(tokens)
}

pub fn run(a: ChatArgs) -> Result<()> {
    let rt = runtime::load(&a.model)?;
    let prompt = prompt_tokens(&rt.tok, &a.prompt, a.raw)?;
    if prompt.len() + 1 > rt.context {
        return Err(GenerateError::PromptTooLong { prompt: prompt.len(), context: rt.context, reserve: 1 }.into());
    }
    eprintln!(
        "device: {}  load: {:.2}s  weights on device: {:.1} MiB",
        rt.device_name,
        rt.load_time.as_secs_f64(),
        rt.model.weights_device_bytes() as f64 / 1048576.0
    );
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed: a.seed,
            ..Default::default()
        },
        stop: a.stop.clone(),
    };
    let mut session = Session::new(&rt.model, rt.context);
    let mut stream = session.generate(&prompt, &rt.tok, params)?;
    let mut out = std::io::stdout().lock();
    let tokens = drain(&mut stream, &mut out, !a.json)?;
    let tail = stream.finish();
    let t = stream.timings.clone();
    let text = stream.text().to_string();
    if a.json {
        let v = json!({
            "prompt_tokens": prompt, "tokens": tokens, "text": text,
            "timings": {"load_s": rt.load_time.as_secs_f64(), "prefill_s": t.prefill.as_secs_f64(), "prefill_tok_s": t.prefill_tok_s(), "decode_s": t.decode.as_secs_f64(), "decode_tok_s": t.decode_tok_s(), "generated": t.generated},
            "weights_device_bytes": rt.model.weights_device_bytes(),
            "device": rt.device_name,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{tail}")?;
    }
    eprintln!(
        "prompt: {} tok, prefill {:.1} tok/s | generated: {} tok, decode {:.1} tok/s",
        t.prompt_tokens,
        t.prefill_tok_s(),
        t.generated,
        t.decode_tok_s()
    );
    Ok(())
}
