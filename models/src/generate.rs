//! Generation: prefill, then one token at a time, streamed as text pieces.
//!
//! A `Session` owns the KV cache of one conversation; `generate` borrows it and yields
//! `Piece`s. The cache keeps what was already run, so a follow-up turn costs only its
//! own new tokens.

use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use vidllm_core::GenerateError;
use vidllm_core::sampler::{Sampler, SamplerConfig};
use vidllm_core::stream::TextStream;
use vidllm_core::tokenizer::Tokenizer;

use crate::llama::{KvCache, Llama, Logits};

/// One generated token and the text it completed.
#[derive(Debug, Clone)]
pub struct Piece {
    pub id: u32,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends when the text contains one of these (it is not emitted).
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_tokens: 256, sampler: SamplerConfig::default(), stop: Vec::new() }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub generated: usize,
    pub decode: Duration,
}

impl Timings {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens that needed a forward pass of their own.
    pub fn decode_tok_s(&self) -> f64 {
        self.generated.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Read a `[1, vocab]` logits tensor back to the host.
pub fn read_row(t: Tensor<2>) -> Result<Vec<f32>, GenerateError> {
    let data = t.try_into_data().map_err(|e| GenerateError::Device(format!("{e:?}")))?;
    data.try_into_vec::<f32>().map_err(|e| GenerateError::Device(format!("{e:?}")))
}

pub struct Session<'m> {
    pub model: &'m Llama,
    pub cache: KvCache,
    /// Every token in the cache, in order.
    pub history: Vec<u32>,
}

impl<'m> Session<'m> {
    /// A conversation holding up to `context` tokens.
    pub fn new(model: &'m Llama, context: usize) -> Self {
        let context = context.min(model.rope_positions());
        Self { model, cache: KvCache::new(&model.cfg, context, &model.device), history: Vec::new() }
    }

    pub fn context(&self) -> usize {
        self.cache.capacity
    }

    /// Run `tokens` after what the cache holds (and after the last answer's final token,
    /// which was sampled but not run); returns the last position's logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        self.prefill_with(tokens, None)
    }

    /// As `prefill`, with input embeddings for `tokens` given (visual tokens merged in).
    ///
    /// # Shapes
    /// - embeds: `[tokens.len(), d_model]`
    pub fn prefill_embeds(&mut self, tokens: &[u32], embeds: Tensor<2>) -> Result<Vec<f32>, GenerateError> {
        self.prefill_with(tokens, Some(embeds))
    }

    fn prefill_with(&mut self, tokens: &[u32], embeds: Option<Tensor<2>>) -> Result<Vec<f32>, GenerateError> {
        if tokens.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let pending: Vec<u32> = self.history[self.cache.len..].to_vec();
        let needed = self.cache.len + pending.len() + tokens.len();
        if needed + 1 > self.cache.capacity {
            return Err(GenerateError::PromptTooLong { prompt: needed, context: self.cache.capacity, reserve: 1 });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.model.cfg.vocab_size) {
            return Err(GenerateError::Tokenizer(format!("token id {bad} is outside the vocabulary")));
        }
        let x = match embeds {
            Some(e) if pending.is_empty() => e,
            Some(e) => Tensor::cat(vec![self.model.embed.lookup(&pending, &self.model.device), e], 0),
            None => self.model.embed.lookup(&[pending.as_slice(), tokens].concat(), &self.model.device),
        };
        let logits = self.model.forward_embeds(x, &mut self.cache, Logits::Last);
        self.history.extend_from_slice(tokens);
        read_row(logits)
    }

    /// Stream the answer to `prompt` (tokens to add after the cache's contents).
    pub fn generate<'s>(
        &'s mut self,
        prompt: &[u32],
        tok: &'s Tokenizer,
        params: GenerateParams,
    ) -> Result<TokenStream<'s, 'm>, GenerateError> {
        self.generate_with(prompt, None, tok, params)
    }

    /// Stream the answer to a prompt whose input embeddings are given (visual tokens).
    pub fn generate_embeds<'s>(
        &'s mut self,
        prompt: &[u32],
        embeds: Tensor<2>,
        tok: &'s Tokenizer,
        params: GenerateParams,
    ) -> Result<TokenStream<'s, 'm>, GenerateError> {
        self.generate_with(prompt, Some(embeds), tok, params)
    }

    fn generate_with<'s>(
        &'s mut self,
        prompt: &[u32],
        embeds: Option<Tensor<2>>,
        tok: &'s Tokenizer,
        params: GenerateParams,
    ) -> Result<TokenStream<'s, 'm>, GenerateError> {
        let t0 = Instant::now();
        let logits = self.prefill_with(prompt, embeds)?;
        let timings = Timings { prompt_tokens: prompt.len(), prefill: t0.elapsed(), ..Default::default() };
        let sampler = Sampler::new(params.sampler.clone());
        Ok(TokenStream {
            session: self,
            tok,
            params,
            sampler,
            logits: Some(logits),
            text: String::new(),
            emitted: 0,
            detok: TextStream::new(),
            timings,
            done: false,
        })
    }
}

/// The answer, one piece at a time.
pub struct TokenStream<'s, 'm> {
    session: &'s mut Session<'m>,
    tok: &'s Tokenizer,
    params: GenerateParams,
    sampler: Sampler,
    /// Logits for the next token; `None` when the last token has not been run yet.
    logits: Option<Vec<f32>>,
    /// All text produced so far, and how much of it was already emitted.
    text: String,
    emitted: usize,
    detok: TextStream,
    pub timings: Timings,
    done: bool,
}

impl TokenStream<'_, '_> {
    fn step(&mut self) -> Result<Option<Piece>, GenerateError> {
        if self.done || self.timings.generated >= self.params.max_tokens {
            return Ok(None);
        }
        let logits = match self.logits.take() {
            Some(l) => l,
            None => {
                let last = *self.session.history.last().expect("a token was generated");
                if self.session.cache.len + 1 > self.session.cache.capacity {
                    return Ok(None); // context full: end of answer
                }
                let t0 = Instant::now();
                let out = self.session.model.forward(&[last], &mut self.session.cache, Logits::Last);
                let row = read_row(out)?;
                self.timings.decode += t0.elapsed();
                row
            }
        };
        let id = self.sampler.sample(&logits, &self.session.history);
        if self.tok.is_eog(id) {
            self.done = true;
            return Ok(None);
        }
        // The token is not in the cache yet: it runs at the next step.
        self.session.history.push(id);
        self.timings.generated += 1;
        self.text.push_str(&self.detok.push(self.tok, id));
        Ok(Some(Piece { id, text: self.release() }))
    }

    /// Text that can be emitted: everything except a tail that could still begin a stop
    /// string; a completed stop string ends generation.
    fn release(&mut self) -> String {
        if let Some(pos) = self.params.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.done = true;
            self.text.truncate(pos);
        }
        let hold = if self.done { 0 } else { self.held_back() };
        let end = self.text.len() - hold;
        let out = self.text[self.emitted.min(end)..end].to_string();
        self.emitted = self.emitted.max(end);
        out
    }

    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.params.stop {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        hold
    }

    /// Text still held at the end (an unfinished character or a partial stop string).
    pub fn finish(&mut self) -> String {
        if !self.done {
            self.text.push_str(&self.detok.finish());
        }
        self.done = true;
        let out = self.text[self.emitted.min(self.text.len())..].to_string();
        self.emitted = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

impl Iterator for TokenStream<'_, '_> {
    type Item = Result<Piece, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
