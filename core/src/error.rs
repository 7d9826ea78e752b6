//! Errors of the runtime core. Every loader path returns one of these; none panics on bad input.

use thiserror::Error;

/// Why a model file could not be read.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("GGUF file truncated: {what} needs {need} bytes at offset {offset}, file has {len}")]
    Truncated { what: String, offset: u64, need: u64, len: u64 },
    #[error("GGUF {what} is absurd: {value}")]
    Absurd { what: String, value: u64 },
    #[error("GGUF metadata key {key} has an unknown value type {ty}")]
    UnknownValueType { key: String, ty: u32 },
    /// `what`: ggml's name for the type where it has one (`iq2_xs`), else its id.
    #[error("tensor {name} is of GGML type {what}, which vidllm does not read (it reads {supported})")]
    UnknownTensorType { name: String, what: String, supported: String },
    #[error("tensor {name}: data [{start}, {end}) lies beyond the end of the file ({len} bytes)")]
    TensorOutOfBounds { name: String, start: u64, end: u64, len: u64 },
    #[error("tensor {name}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("missing metadata key {0}")]
    MissingKey(String),
    #[error("metadata key {key} has the wrong type (expected {expected})")]
    WrongKeyType { key: String, expected: &'static str },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Why a generation request could not run. Every front end reports these by kind (the
/// browser as JS errors named by [`GenerateError::kind`]), never by matching messages.
#[derive(Debug, Error)]
pub enum GenerateError {
    #[error("the prompt needs {prompt} tokens of context but the context holds {context} (with {reserve} reserved for the answer)")]
    PromptTooLong { prompt: usize, context: usize, reserve: usize },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("give a video (or an image) before asking")]
    NoVisual,
    #[error("an answer is still streaming: finish or abort it first")]
    Busy,
    #[error("{0}")]
    Unsupported(String),
    #[error("visual tokens: {0}")]
    Visual(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("device: {0}")]
    Device(String),
}

impl GenerateError {
    /// The error's kind, as the browser package names its JS error classes.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PromptTooLong { .. } => "ContextFullError",
            Self::EmptyPrompt | Self::NoVisual | Self::Busy | Self::Unsupported(_) => "InvalidRequestError",
            Self::Template(_) => "TemplateError",
            Self::Tokenizer(_) => "TokenizerError",
            Self::Visual(_) => "VisualTokensError",
            Self::Device(_) => "RuntimeFailedError",
        }
    }
}
