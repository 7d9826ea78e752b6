//! vidllm model graphs, written once for every device: the backend is whatever the
//! `Device` names at run time; 4-bit matrices go through `vidllm_shaders::QuantOps`.

pub mod clip;
pub mod conversation;
pub mod decoder_family;
pub mod dinov2;
pub mod fastvid;
pub mod framefusion;
pub mod generate;
pub mod idefics3;
pub mod kv_cache;
pub mod languagebind;
pub mod layers;
pub mod live_window;
pub mod llama;
pub mod llama_gguf;
pub mod llama_hf;
pub mod llava;
pub mod llava_next_video;
pub mod maxinfo;
pub mod merge;
pub mod merv;
pub mod merv_fusion;
pub mod mmproj;
pub mod model_files;
pub mod pllava;
pub mod pllava_pool;
pub mod quant_linear;
pub mod rms_norm;
pub mod rope;
pub mod siglip;
pub mod slowfast;
pub mod smolvlm;
pub mod smolvlm_connector;
pub mod step_graph;
pub mod token_budget;
pub mod video_llava;
pub mod video_model;
pub mod vivit;

pub use conversation::{Conversation, FinishReason, Finished, Model, Prompt, Step};
pub use decoder_family::Family;
pub use generate::{GenerateParams, Piece, Timings};
pub use kv_cache::{KvCache, KvChoice, KvType};
pub use llama::{Llama, LlamaConfig, Logits};
pub use llama_gguf::{config_from_gguf, load_llama};
