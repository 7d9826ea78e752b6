//! `tokenize` and `logits`: what the model sees and what it predicts, for parity checks.

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;
use vidllm_models::generate::read_row;
use vidllm_models::{KvCache, Logits};

use crate::progress::Progress;
use crate::{ModelArgs, runtime};

#[derive(Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub text: String,
    #[arg(long)]
    pub json: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = runtime::load_tokenizer(&a.model)?;
    let ids = tok.encode(&a.text, tok.add_bos)?;
    if a.json {
        println!("{}", json!({ "tokens": ids }));
    } else {
        for id in ids {
            println!("{id:>7} {:?}", String::from_utf8_lossy(tok.token_bytes(id)));
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub prompt: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_tokens: Option<Vec<u32>>,
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let rt = runtime::load(&a.model, Progress::new(false))?;
    let tokens = match (&a.prompt, &a.prompt_tokens) {
        (Some(p), _) => rt.tok.encode(p, rt.tok.add_bos)?,
        (None, Some(t)) => t.clone(),
        (None, None) => bail!("give --prompt or --prompt-tokens"),
    };
    if tokens.is_empty() {
        bail!("the prompt is empty");
    }
    if tokens.len() > rt.context {
        bail!("prompt has {} tokens but the context holds {}", tokens.len(), rt.context);
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= rt.model.decoder().cfg.vocab_size) {
        bail!("token id {bad} is outside the vocabulary ({})", rt.model.decoder().cfg.vocab_size);
    }
    let kv = a.model.kv.resolve(rt.model.decoder().cfg.d_head);
    if !kv.fits(rt.model.decoder().cfg.d_head) {
        bail!("--kv {kv}: the decoder's heads ({}) are not whole 32-value blocks", rt.model.decoder().cfg.d_head);
    }
    let mut cache = KvCache::typed(kv, &rt.model.decoder().cfg, tokens.len(), &rt.model.decoder().device);
    let all = read_row(rt.model.decoder().forward(&tokens, &mut cache, Logits::All))?;
    let vocab = rt.model.decoder().cfg.vocab_size;
    let positions: Vec<_> = all.chunks(vocab).map(|row| json!({ "top": top_k(row, a.top) })).collect();
    if a.json {
        println!("{}", json!({ "tokens": tokens, "positions": positions }));
    } else {
        for (t, p) in tokens.iter().zip(&positions) {
            println!("{t:>7} -> {}", p["top"]);
        }
    }
    Ok(())
}

fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.into_iter().take(k).map(|i| (i, row[i as usize])).collect()
}
