//! A conversation: the turn state machine that every front end drives (`vidllm-native
//! chat` and `ask`, the browser page and its worker).
//!
//! A [`Conversation`] holds the model, its tokenizer, the KV cache and the visuals being
//! talked about, and renders each question through the model's own turn format. It is
//! sans-IO: it never reads the device. [`Conversation::step`] hands the driver the
//! `[1, vocab]` logits tensor it needs; the driver reads it back (blocking natively, with
//! `into_data_async` in a browser, where blocking is forbidden) and passes the row to
//! [`Conversation::accept`], which samples, detokenises and applies the stop rules. The
//! two drivers, [`Conversation::answer`] and [`Conversation::answer_async`], are that loop
//! and nothing more, so both stop at the same token for the same reason.
//!
//! The context rule, in one place: a prompt is refused (before anything changes) unless
//! the cache has room for it plus one answer token; a sampled token is run only while the
//! cache has a free position for it, else the answer ends with [`FinishReason::ContextFull`].

use std::rc::Rc;

use burn::tensor::Tensor;
use vidllm_core::GenerateError;
use vidllm_core::chat::Message;
use vidllm_core::sampler::Sampler;
use vidllm_core::sampling::FrameTimes;
use vidllm_core::stream::TextStream;
use vidllm_core::tokenizer::Tokenizer;
use web_time::Instant;

use crate::framefusion::{FrameFusion, FusionReport, Plan};
use crate::generate::{GenerateParams, Piece, Timings, read_row, read_row_async};
use crate::kv_cache::{KvCache, KvChoice, KvType};
use crate::llama::{Fused, FusedPrefill, Llama, Logits};
use crate::merge::{Visual, merge_embeddings, merge_patches, merge_positions};
use crate::video_model::VideoModel;

/// What a conversation talks to: a text decoder (a GGUF file), or a video-language model.
// Built once and shared behind an `Rc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Text(Llama),
    Video(VideoModel),
}

impl Model {
    pub fn decoder(&self) -> &Llama {
        match self {
            Self::Text(m) => m,
            Self::Video(m) => m.decoder(),
        }
    }

    pub fn video(&self) -> Option<&VideoModel> {
        match self {
            Self::Text(_) => None,
            Self::Video(m) => Some(m),
        }
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model wrote an end-of-generation token.
    EndOfText,
    /// The text reached a stop string (it is cut just before it).
    StopString,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The cache has no position left for the last sampled token.
    ContextFull,
    /// The driver aborted.
    Aborted,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            Self::EndOfText | Self::StopString | Self::Aborted => "stop",
            Self::MaxTokens | Self::ContextFull => "length",
        }
    }
}

/// The end of an answer.
#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    /// Text held back until the end (an unfinished character, a partial stop string).
    pub tail: String,
    /// The whole answer (cut before a stop string).
    pub text: String,
    pub tokens: Vec<u32>,
    pub timings: Timings,
    /// What FrameFusion did in the prefill, where it reduced the video.
    pub fusion: Option<FusionReport>,
}

/// What the driver does next.
// One value a step, moved once: boxing the finished answer would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Read this `[1, n]` row back and pass it to [`Conversation::accept`]: logits, or
    /// values a FrameFusion prefill chooses by.
    Read(Tensor<2>),
    /// The answer ended.
    Finished(Finished),
}

/// The device work an answer needs next (see [`Conversation::plan`]).
// One value a step, moved once: boxing the tensor would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Work {
    /// The turn's input embeddings, run after what the cache holds (at these positions,
    /// where given; through FrameFusion, where a video asks for it).
    Prefill(Tensor<2>, Option<Vec<usize>>, Option<Fusion>),
    /// The last sampled token, run at the cache's next position.
    Decode(u32),
    /// Nothing: the answer ended.
    Done,
}

/// A FrameFusion prefill under way: the pass, the method's state, and the values last read
/// for it.
struct FusedRun {
    pass: FusedPrefill,
    method: FrameFusion,
    values: Option<Vec<f32>>,
}

/// A video FrameFusion reduces in the prefill: its plan, and each prompt row's patch.
type Fusion = (Plan, Vec<Option<usize>>);

/// A turn's input as the first step runs it: ids, embeddings, positions, FrameFusion's plan.
type RunInput = (Vec<u32>, Tensor<2>, Option<Vec<usize>>, Option<Fusion>);

/// A turn's input: whether the cache starts over, its ids, their embeddings where visual
/// rows are merged in, their RoPE positions where not the next ones, and FrameFusion's
/// plan where a video asks for it.
type TurnInput = (bool, Vec<u32>, Option<Tensor<2>>, Option<Vec<usize>>, Option<Fusion>);

/// The input of a turn.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// A question, rendered through the model's turn format (first turn or follow-up).
    Question(&'a str),
    /// Text used as written (placeholders included): BOS as the model asks on a first
    /// turn, none on a later one.
    Raw(&'a str),
    /// Token ids, run after what the cache holds.
    Tokens(&'a [u32]),
}

/// The answer being generated.
struct Answer {
    params: GenerateParams,
    sampler: Sampler,
    detok: TextStream,
    /// The turn's input, run by the first step: its ids, their embeddings, their RoPE
    /// positions where they are not the cache's next ones (a reduced video's), and
    /// FrameFusion's plan.
    input: Option<RunInput>,
    /// What FrameFusion did in the prefill.
    fusion: Option<FusionReport>,
    /// A FrameFusion prefill between read-backs.
    fused: Option<Box<FusedRun>>,
    /// All text so far, and how much of it was emitted.
    text: String,
    emitted: usize,
    tokens: Vec<u32>,
    timings: Timings,
    /// When the row being read was asked for, and whether it is the prefill's.
    asked: Option<Instant>,
    prefilling: bool,
    finish: Option<FinishReason>,
    /// The question, for the chat history of text models (`None` for raw input).
    question: Option<String>,
}

impl Answer {
    /// Text that can be emitted: all but a tail that could still begin a stop string. A
    /// completed stop string ends the answer, cut before it.
    fn release(&mut self) -> String {
        if let Some(pos) = self.params.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.finish = Some(FinishReason::StopString);
            self.text.truncate(pos);
        }
        let hold = if self.finish.is_some() { 0 } else { self.held_back() };
        let end = self.text.len() - hold;
        let out = self.text[self.emitted.min(end)..end].to_string();
        self.emitted = self.emitted.max(end);
        out
    }

    /// Bytes at the end of the text that begin one of the stop strings.
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
}

pub struct Conversation {
    model: Rc<Model>,
    tok: Rc<Tokenizer>,
    cache: KvCache,
    /// Every token in the cache, in order, then the last sampled one (not run yet).
    history: Vec<u32>,
    /// Still images' visual tokens, one entry an image, asked about with the first question.
    images: Vec<Visual>,
    video: Option<Visual>,
    /// When the video's frames were taken (some architectures' prompts state it).
    video_times: Option<FrameTimes>,
    /// The turns so far, for models whose follow-ups go through a chat template.
    messages: Vec<Message>,
    answer: Option<Answer>,
}

impl Conversation {
    /// A conversation holding up to `context` tokens (at least 2, at most the model's).
    pub fn new(model: Rc<Model>, tok: Rc<Tokenizer>, context: usize) -> Self {
        let decoder = model.decoder();
        let context = context.clamp(2, decoder.rope_positions().max(2));
        let cache = KvCache::new(&decoder.cfg, context, &decoder.device);
        Self {
            model,
            tok,
            cache,
            history: Vec::new(),
            images: Vec::new(),
            video: None,
            video_times: None,
            messages: Vec::new(),
            answer: None,
        }
    }

    /// Keep the keys and values in `kv` from now on (a new conversation starts, with a
    /// new cache of the same context): a type, or [`KvChoice::Auto`]'s for this decoder.
    /// Refused where the decoder's heads are not whole blocks of the type.
    pub fn set_kv(&mut self, kv: impl Into<KvChoice>) -> Result<(), String> {
        let decoder = self.model.decoder();
        let kv = kv.into().resolve(decoder.cfg.d_head);
        if !kv.fits(decoder.cfg.d_head) {
            return Err(format!("a {kv} KV cache needs heads of whole 32-value blocks; this decoder's heads are {}", decoder.cfg.d_head));
        }
        self.cache = KvCache::typed(kv, &decoder.cfg, self.cache.capacity, &decoder.device);
        self.reset();
        Ok(())
    }

    /// What the KV cache keeps its keys and values in.
    pub fn kv_type(&self) -> KvType {
        self.cache.kv_type()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// Tokens the cache can hold.
    pub fn context(&self) -> usize {
        self.cache.capacity
    }

    /// The RoPE position the next token run takes: the tokens in the cache, plus the
    /// positions a reduced video's dropped tokens left (FastVID's kept tokens keep theirs).
    pub fn next_position(&self) -> usize {
        self.cache.next_position()
    }

    /// Every token of the conversation so far (the last sampled one included).
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Talk about this video, whose frames were taken at `times`, from now on (a new
    /// conversation starts).
    pub fn set_video(&mut self, video: Visual, times: FrameTimes) {
        self.video = Some(video);
        self.video_times = Some(times);
        self.reset();
    }

    pub fn video(&self) -> Option<&Visual> {
        self.video.as_ref()
    }

    /// Encode a still image (its RGB planes `[1, 3, h, w]`, 0..=255; the model's processor
    /// prepares it), asked about with the next first question; a new conversation starts.
    pub fn add_image(&mut self, planes: Tensor<4>) -> Result<(), GenerateError> {
        let m = self
            .model
            .video()
            .ok_or_else(|| GenerateError::Unsupported("this is a text model: images need a video-language model".into()))?;
        if !m.supports_images() {
            return Err(GenerateError::Unsupported(format!("{} takes no still images (Video-LLaVA does)", m.model_type())));
        }
        let image = m.encode_images(vec![planes]).map_err(|e| GenerateError::Visual(e.to_string()))?;
        self.add_encoded_image(image);
        Ok(())
    }

    /// An image already encoded (by [`VideoModel::encode_images`]; a server keeps them by
    /// content), asked about with the next first question; a new conversation starts.
    pub fn add_encoded_image(&mut self, image: Visual) {
        self.images.push(image);
        self.reset();
    }

    /// Visual tokens of the images and the video being talked about.
    pub fn visual_tokens(&self) -> usize {
        self.images.iter().chain(&self.video).map(|v| v.features.dims()[0]).sum()
    }

    /// Forget the video, the images and the conversation.
    pub fn clear_visuals(&mut self) {
        self.video = None;
        self.video_times = None;
        self.images.clear();
        self.reset();
    }

    /// Start a new conversation about the same visuals (their encoding is kept).
    pub fn reset(&mut self) {
        self.cache.truncate(0);
        self.history.clear();
        self.messages.clear();
        self.answer = None;
    }

    /// Start answering `prompt`. Nothing changes when it is refused (too long for the
    /// context, no visual to ask about, an answer still streaming): the conversation
    /// goes on as before.
    pub fn ask(&mut self, prompt: Prompt, params: GenerateParams) -> Result<(), GenerateError> {
        if self.answer.is_some() {
            return Err(GenerateError::Busy);
        }
        let (restart, ids, embeds, positions, fusion) = self.turn_input(prompt)?;
        let kept = if restart { 0 } else { self.cache.len };
        let pending: &[u32] = if restart { &[] } else { &self.history[self.cache.len..] };
        if ids.is_empty() && pending.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let needed = kept + pending.len() + ids.len();
        if needed + 1 > self.cache.capacity {
            return Err(GenerateError::PromptTooLong { prompt: needed, context: self.cache.capacity, reserve: 1 });
        }
        let decoder = self.model.decoder();
        // A reduced video keeps its unreduced positions: the RoPE table must reach past them.
        if let Some(last) = positions.as_ref().and_then(|p| p.last()) {
            let spanned = last + 1;
            if spanned + 1 > decoder.rope_positions() {
                return Err(GenerateError::PromptTooLong { prompt: spanned, context: decoder.rope_positions(), reserve: 1 });
            }
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= decoder.cfg.vocab_size) {
            return Err(GenerateError::Tokenizer(format!("token id {bad} is outside the vocabulary")));
        }
        // The last answer's final token was sampled but not run: it goes first.
        let x = match embeds {
            Some(e) if pending.is_empty() => e,
            Some(e) => Tensor::cat(vec![decoder.embed.lookup(pending, &decoder.device), e], 0),
            None => decoder.embed.lookup(&[pending, ids.as_slice()].concat(), &decoder.device),
        };
        if restart {
            // The turn re-runs the whole conversation: the cache starts over, the
            // messages it renders stay.
            self.cache.truncate(0);
            self.history.clear();
        }
        let question = match prompt {
            Prompt::Question(q) => Some(q.to_string()),
            _ => None,
        };
        self.answer = Some(Answer {
            sampler: Sampler::new(params.sampler.clone()),
            params,
            detok: TextStream::new(),
            input: Some((ids, x, positions, fusion)),
            fusion: None,
            fused: None,
            text: String::new(),
            emitted: 0,
            tokens: Vec::new(),
            timings: Timings::default(),
            asked: None,
            prefilling: false,
            finish: None,
            question,
        });
        Ok(())
    }

    /// The token ids of a turn and, when visual tokens are merged in, its embeddings;
    /// `restart` when the cache must be dropped first (a follow-up whose chat-template
    /// rendering does not continue what is in the cache).
    fn turn_input(&self, prompt: Prompt) -> Result<TurnInput, GenerateError> {
        let tok = &*self.tok;
        let first = self.history.is_empty();
        let tokenizer = |e: vidllm_core::LoadError| GenerateError::Tokenizer(e.to_string());
        Ok(match (prompt, &*self.model) {
            (Prompt::Tokens(ids), _) => (false, ids.to_vec(), None, None, None),
            (Prompt::Raw(text), Model::Video(m)) if first => {
                let (ids, embeds, positions, fusion) = self.first_turn(m, text)?;
                (false, ids, Some(embeds), positions, fusion)
            }
            (Prompt::Raw(text), _) => (false, tok.encode(text, first && tok.add_bos).map_err(tokenizer)?, None, None, None),
            (Prompt::Question(q), Model::Video(m)) if first => {
                let text = match (&self.video, self.images.len()) {
                    (Some(_), _) => m.first_turn(tok, q, &self.images, self.video_times.as_ref())?,
                    (None, n) if n > 0 => m.first_turn(tok, q, &self.images, None)?,
                    (None, _) => return Err(GenerateError::NoVisual),
                };
                let (ids, embeds, positions, fusion) = self.first_turn(m, &text)?;
                (false, ids, Some(embeds), positions, fusion)
            }
            (Prompt::Question(q), Model::Video(m)) => {
                (false, tok.encode(&m.follow_up(tok, q), false).map_err(tokenizer)?, None, None, None)
            }
            (Prompt::Question(q), Model::Text(_)) if first => (false, tok.chat_tokens(&[Message::new("user", q)])?, None, None, None),
            (Prompt::Question(q), Model::Text(_)) => {
                let (restart, ids, embeds) = self.text_follow_up(q)?;
                (restart, ids, embeds, None, None)
            }
        })
    }

    /// A first turn's ids, placeholders expanded, its embeddings, visual rows merged in,
    /// their RoPE positions where a reduced video keeps its unreduced ones, and
    /// FrameFusion's plan where the video asks for it.
    fn first_turn(&self, m: &VideoModel, text: &str) -> Result<RunInput, GenerateError> {
        let visual = |e: vidllm_core::LoadError| GenerateError::Visual(e.to_string());
        // All images fill the `<image>` placeholders in order, as one run of features.
        let mut visuals: Vec<Visual> = match self.images.first() {
            Some(first) => vec![Visual::new(
                first.token,
                Tensor::cat(self.images.iter().map(|v| v.features.clone()).collect(), 0),
                first.per_placeholder,
            )],
            None => Vec::new(),
        };
        visuals.extend(self.video.clone());
        let ids = m.first_turn_ids(&self.tok, text, &visuals).map_err(visual)?;
        let embeds = merge_embeddings(m.decoder(), &ids, &visuals).map_err(visual)?;
        let positions = merge_positions(&ids, &visuals);
        let fusion = merge_patches(&ids, &visuals);
        Ok((ids, embeds, positions, fusion))
    }

    /// A text model's follow-up: the chat template over the whole conversation, minus what
    /// the cache already holds. Where the rendering does not continue the cached text (a
    /// template that rewrites earlier turns), the whole conversation is run again.
    fn text_follow_up(&self, q: &str) -> Result<(bool, Vec<u32>, Option<Tensor<2>>), GenerateError> {
        let tok = &*self.tok;
        let tokenizer = |e: vidllm_core::LoadError| GenerateError::Tokenizer(e.to_string());
        let Some((Message { content: answer, .. }, asked)) = self.messages.split_last() else {
            // The conversation so far was raw text: the question continues it as written.
            return Ok((false, tok.encode(q, false).map_err(tokenizer)?, None));
        };
        let mut all = self.messages.clone();
        all.push(Message::new("user", q));
        let before = tok.render_chat(asked)? + answer;
        let now = tok.render_chat(&all)?;
        match now.strip_prefix(&before) {
            Some(rest) => Ok((false, tok.encode(rest, false).map_err(tokenizer)?, None)),
            None => Ok((true, tok.chat_tokens(&all)?, None)),
        }
    }

    /// What the driver must do next: read a logits row, or take the finished answer.
    pub fn step(&mut self) -> Result<Step, GenerateError> {
        if self.fusing() {
            return self.fused_step().map(Step::Read);
        }
        Ok(match self.plan()? {
            Work::Prefill(x, at, fusion) => Step::Read(self.prefill(x, at, fusion)?),
            Work::Decode(last) => Step::Read(self.model.decoder().forward(&[last], &mut self.cache, Logits::Last)),
            Work::Done => Step::Finished(self.finish()),
        })
    }

    /// [`Conversation::step`] for several conversations with one model, as a server runs
    /// them: a turn's input (a prefill) runs on its own, and every conversation that needs
    /// one token run (a decode step) joins one batched forward pass, so the weights are
    /// read once for all of them. Conversations may join and leave between calls
    /// (continuous batching). Each result is what [`Conversation::step`] would have given
    /// that conversation: its row of the batched pass, whose products keep each row's
    /// arithmetic its own ([`Llama::forward_batch`]).
    pub fn step_many(convs: &mut [&mut Conversation]) -> Vec<Result<Step, GenerateError>> {
        let mut out: Vec<Option<Result<Step, GenerateError>>> = convs.iter().map(|_| None).collect();
        let mut decoding = Vec::new();
        for (i, c) in convs.iter_mut().enumerate() {
            if c.fusing() {
                out[i] = Some(c.fused_step().map(Step::Read));
                continue;
            }
            match c.plan() {
                Ok(Work::Decode(last)) => decoding.push((i, last)),
                Ok(Work::Prefill(x, at, fusion)) => out[i] = Some(c.prefill(x, at, fusion).map(Step::Read)),
                Ok(Work::Done) => out[i] = Some(Ok(Step::Finished(c.finish()))),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        if let Some(&(first, _)) = decoding.first() {
            let model = convs[first].model.clone();
            let tokens: Vec<u32> = decoding.iter().map(|&(_, t)| t).collect();
            let mut batch: Vec<(usize, &mut Conversation)> =
                convs.iter_mut().enumerate().filter(|(i, _)| decoding.iter().any(|d| d.0 == *i)).map(|(i, c)| (i, &mut **c)).collect();
            if batch.iter().any(|(_, c)| !Rc::ptr_eq(&c.model, &model)) {
                for (i, c) in batch {
                    c.answer = None;
                    out[i] = Some(Err(GenerateError::Unsupported("conversations stepped together must share one model".into())));
                }
            } else {
                let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|(_, c)| &mut c.cache).collect();
                let logits = model.decoder().forward_batch(&tokens, &mut caches);
                for (row, (i, _)) in batch.iter().enumerate() {
                    out[*i] = Some(Ok(Step::Read(logits.clone().narrow(0, row, 1))));
                }
            }
        }
        out.into_iter().map(|s| s.expect("every conversation was stepped")).collect()
    }

    /// The device work the answer needs next, with its bookkeeping done: a turn's input to
    /// prefill (its ids now in the history), one token to run, or nothing (it ended).
    fn plan(&mut self) -> Result<Work, GenerateError> {
        let a = self.answer.as_mut().ok_or_else(|| GenerateError::Unsupported("no answer is in progress (ask first)".into()))?;
        if let Some((ids, x, at, fusion)) = a.input.take() {
            a.asked = Some(Instant::now());
            a.timings.prompt_tokens = x.dims()[0];
            // The cache will hold what it held, the pending token and the turn's input.
            self.history.extend_from_slice(&ids);
            a.prefilling = true;
            return Ok(Work::Prefill(x, at, fusion));
        }
        if a.finish.is_none() {
            if a.tokens.len() >= a.params.max_tokens {
                a.finish = Some(FinishReason::MaxTokens);
            } else if self.cache.len + 1 > self.cache.capacity || self.cache.next_position() >= self.model.decoder().rope_positions() {
                a.finish = Some(FinishReason::ContextFull);
            } else {
                a.asked = Some(Instant::now());
                return Ok(Work::Decode(*self.history.last().expect("an answer token was sampled")));
            }
        }
        Ok(Work::Done)
    }

    /// Close the ended answer: flush the detokeniser, record the turn.
    fn finish(&mut self) -> Finished {
        let mut a = self.answer.take().expect("an answer ended");
        let reason = a.finish.expect("it has a reason");
        if reason != FinishReason::StopString {
            let rest = a.detok.finish();
            a.text.push_str(&rest);
        }
        let tail = a.text[a.emitted.min(a.text.len())..].to_string();
        if let Some(q) = a.question {
            self.messages.push(Message::new("user", &q));
            self.messages.push(Message::new("assistant", &a.text));
        }
        Finished { reason, tail, text: a.text, tokens: a.tokens, timings: a.timings, fusion: a.fusion }
    }

    /// Run a turn's input: through FrameFusion where its video asks for it (its report
    /// kept for the answer; the first values it chooses by may be what this returns), else
    /// as it is. A failed prefill ends the answer.
    fn prefill(&mut self, x: Tensor<2>, at: Option<Vec<usize>>, fusion: Option<Fusion>) -> Result<Tensor<2>, GenerateError> {
        let decoder = self.model.decoder();
        let Some((plan, patches)) = fusion else {
            return Ok(decoder.forward_embeds_at(x, at.as_deref(), &mut self.cache, Logits::Last));
        };
        let mut ff = FrameFusion::new(plan, patches, decoder.blocks.len());
        match decoder.fused_begin(x, &mut self.cache, &mut ff) {
            Ok(run) => {
                if let Some(a) = self.answer.as_mut() {
                    a.fused = Some(Box::new(FusedRun { pass: run, method: ff, values: None }));
                }
                self.fused_step()
            }
            Err(e) => Err(self.fusion_failed(e)),
        }
    }

    /// Whether a FrameFusion prefill is under way.
    fn fusing(&self) -> bool {
        self.answer.as_ref().is_some_and(|a| a.fused.is_some())
    }

    /// Run the FrameFusion prefill on, with the values read last: what to read next, the
    /// values it chooses by or, at its end, the logits.
    fn fused_step(&mut self) -> Result<Tensor<2>, GenerateError> {
        let model = self.model.clone();
        let decoder = model.decoder();
        let a = self.answer.as_mut().expect("fusing() said an answer is in progress");
        let f = a.fused.as_mut().expect("fusing() said so");
        match decoder.fused_advance(&mut f.pass, &mut self.cache, &mut f.method, f.values.take()) {
            Ok(Fused::Read(t)) => {
                let n = t.dims()[0];
                Ok(t.reshape([1, n]))
            }
            Ok(Fused::Logits(logits)) => {
                let f = a.fused.take().expect("fusing() said so");
                a.fusion = Some(f.method.report().clone());
                Ok(logits)
            }
            Err(e) => Err(self.fusion_failed(e)),
        }
    }

    /// Nothing half-written stays: the conversation starts over.
    fn fusion_failed(&mut self, e: String) -> GenerateError {
        self.answer = None;
        self.reset();
        GenerateError::Visual(e)
    }

    /// Take the logits row the last [`Step::Read`] asked for: sample the next token. Returns
    /// the piece of text it completes, or `None` when the answer ended here.
    pub fn accept(&mut self, row: &[f32]) -> Result<Option<Piece>, GenerateError> {
        let a = self.answer.as_mut().ok_or_else(|| GenerateError::Unsupported("no answer is in progress (ask first)".into()))?;
        if let Some(fused) = a.fused.as_mut() {
            // Values a FrameFusion prefill chooses by: the next step goes on with them.
            fused.values = Some(row.to_vec());
            return Ok(None);
        }
        let vocab = self.model.decoder().cfg.vocab_size;
        if row.len() != vocab {
            return Err(GenerateError::Device(format!("a logits row has {} values, the vocabulary {vocab}", row.len())));
        }
        if let Some(t0) = a.asked.take() {
            if std::mem::take(&mut a.prefilling) {
                a.timings.prefill = t0.elapsed();
            } else {
                a.timings.decode += t0.elapsed();
            }
        }
        if a.finish.is_none() && a.tokens.len() >= a.params.max_tokens {
            a.finish = Some(FinishReason::MaxTokens); // max_tokens 0: the prompt runs, nothing is sampled
        }
        if a.finish.is_some() {
            return Ok(None);
        }
        let id = a.sampler.sample(row, &self.history);
        if self.tok.is_eog(id) {
            a.finish = Some(FinishReason::EndOfText);
            return Ok(None);
        }
        // The token is not in the cache yet: the next step runs it.
        self.history.push(id);
        a.tokens.push(id);
        a.timings.generated += 1;
        let piece = a.detok.push(&self.tok, id);
        a.text.push_str(&piece);
        Ok(Some(Piece { id, text: a.release() }))
    }

    /// End the answer after the token already sampled; the next step finishes it.
    pub fn abort(&mut self) {
        if let Some(a) = self.answer.as_mut() {
            a.finish.get_or_insert(FinishReason::Aborted);
        }
    }

    /// Drive the answer to its end, reading each row back synchronously (native devices).
    /// `on_piece` returns `false` to abort.
    pub fn answer(&mut self, on_piece: impl FnMut(&Piece) -> bool) -> Result<Finished, GenerateError> {
        self.answer_with(read_row, on_piece)
    }

    /// [`Conversation::answer`] for devices that must not block (WebGPU in a browser):
    /// each row is read back with `into_data_async`.
    pub async fn answer_async(&mut self, on_piece: impl FnMut(&Piece) -> bool) -> Result<Finished, GenerateError> {
        self.answer_async_with(read_row_async, || std::future::ready(()), on_piece).await
    }

    /// The blocking driver, with the row read by `read`.
    pub fn answer_with(
        &mut self,
        mut read: impl FnMut(Tensor<2>) -> Result<Vec<f32>, GenerateError>,
        mut on_piece: impl FnMut(&Piece) -> bool,
    ) -> Result<Finished, GenerateError> {
        loop {
            match self.step().inspect_err(|_| self.answer = None)? {
                Step::Read(logits) => {
                    let row = read(logits).inspect_err(|_| self.answer = None)?;
                    self.take_row(&row, &mut on_piece)?;
                }
                Step::Finished(f) => return Ok(f),
            }
        }
    }

    /// The non-blocking driver, with the row read by `read`, and `pause` awaited after each
    /// row's piece is handed out, before the next step: a browser yields to its event loop
    /// there, so that the piece reaches its reader now, not after the next forward pass
    /// (which on the CPU backend runs without a wait of its own).
    pub async fn answer_async_with<F: Future<Output = Result<Vec<f32>, GenerateError>>, P: Future<Output = ()>>(
        &mut self,
        mut read: impl FnMut(Tensor<2>) -> F,
        mut pause: impl FnMut() -> P,
        mut on_piece: impl FnMut(&Piece) -> bool,
    ) -> Result<Finished, GenerateError> {
        loop {
            match self.step().inspect_err(|_| self.answer = None)? {
                Step::Read(logits) => {
                    let row = read(logits).await.inspect_err(|_| self.answer = None)?;
                    self.take_row(&row, &mut on_piece)?;
                    pause().await;
                }
                Step::Finished(f) => return Ok(f),
            }
        }
    }

    /// The drivers' one shared move: accept a row, hand its piece out, abort when told.
    fn take_row(&mut self, row: &[f32], on_piece: &mut impl FnMut(&Piece) -> bool) -> Result<(), GenerateError> {
        if let Some(p) = self.accept(row).inspect_err(|_| self.answer = None)?
            && !on_piece(&p)
        {
            self.abort();
        }
        Ok(())
    }
}
