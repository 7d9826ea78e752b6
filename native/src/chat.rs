//! `chat`: one prompt in, a streamed answer out.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use vidllm_core::chat::Message;
use vidllm_core::sampler::SamplerConfig;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::{Conversation, Finished, GenerateParams, Prompt};

use crate::progress::Progress;
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
    tok.chat_tokens(&[Message::new("user", prompt)]).context("applying the model's chat template (--raw skips it)")
}

/// Drive the conversation's answer to its end, writing each piece to `out` as it comes
/// when `echo` is set. A failed write (a closed pipe) ends the answer and is reported.
pub fn drain(conv: &mut Conversation, out: &mut impl Write, echo: bool) -> Result<Finished> {
    drain_with(conv, out, echo, vidllm_models::generate::read_row)
}

/// [`drain`], each logits row read back by `read` (which may keep a copy).
pub fn drain_with(
    conv: &mut Conversation,
    out: &mut impl Write,
    echo: bool,
    read: impl FnMut(burn::tensor::Tensor<2>) -> Result<Vec<f32>, vidllm_core::GenerateError>,
) -> Result<Finished> {
    let mut failed = None;
    let finished = conv.answer_with(read, |piece| {
        if !echo {
            return true;
        }
        match out.write_all(piece.text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if echo {
        writeln!(out, "{}", finished.tail)?;
    }
    Ok(finished)
}

pub fn run(a: ChatArgs) -> Result<()> {
    let rt = runtime::load(&a.model, Progress::new(a.json))?;
    let prompt = prompt_tokens(&rt.tok, &a.prompt, a.raw)?;
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
    let weights_device_bytes = rt.model.decoder().weights_device_bytes();
    let mut conv = Conversation::new(rt.model, rt.tok, rt.context);
    conv.set_kv(a.model.kv).map_err(|e| anyhow::anyhow!("--kv: {e}"))?;
    // A prompt over the context is refused here, before anything is printed.
    conv.ask(Prompt::Tokens(&prompt), params)?;
    eprintln!(
        "device: {}  load: {:.2}s  weights on device: {:.1} MiB",
        rt.device_name,
        rt.load_time.as_secs_f64(),
        weights_device_bytes as f64 / 1048576.0
    );
    let mut out = std::io::stdout().lock();
    let f = drain(&mut conv, &mut out, !a.json)?;
    let t = &f.timings;
    if a.json {
        let v = json!({
            "prompt_tokens": prompt, "tokens": f.tokens, "text": f.text, "finish_reason": f.reason.openai(),
            "timings": {"load_s": rt.load_time.as_secs_f64(), "prefill_s": t.prefill.as_secs_f64(), "prefill_tok_s": t.prefill_tok_s(), "decode_s": t.decode.as_secs_f64(), "decode_tok_s": t.decode_tok_s(), "generated": t.generated},
            "weights_device_bytes": weights_device_bytes,
            "device": rt.device_name,
        });
        writeln!(out, "{v}")?;
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
