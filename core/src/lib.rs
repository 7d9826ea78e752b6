//! vidllm runtime core: model-file loading, GGML blocks, tokenizer, chat prompts,
//! sampling and streaming. Knows nothing of devices or backends.

pub mod chat;
pub mod error;
pub mod ggml;
pub mod gguf;
pub mod preprocess;
pub mod progress;
pub mod safetensors;
pub mod sampler;
pub mod sampling;
pub mod stream;
pub mod tokenizer;

pub use error::{GenerateError, LoadError};
