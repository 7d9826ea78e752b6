//! The decoder families that run on the LLaMA graph (`llama.rs`), and what each adds.
//!
//! | family | q/k/v bias | QK-norm | head size | RoPE pairs in GGUF |
//! |---|---|---|---|---|
//! | `llama` | if `attention_bias` | no | `d_model / n_heads` | interleaved (llama.cpp permutes q/k rows) |
//! | `qwen2` | always | no | `d_model / n_heads` | rotate-half (NeoX; rows as in the checkpoint) |
//! | `qwen3` | if `attention_bias` | per-head RMSNorm on q and k | `head_dim` | rotate-half |
//!
//! GGUF's `general.architecture` and a Hugging Face `config.json`'s `model_type` spell
//! the three the same way, so one name picks the family in either format.

use vidllm_core::LoadError;

use crate::rope::RopeStyle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Llama, Family::Qwen2, Family::Qwen3];

    /// The GGUF architecture / `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// The family called `name`, or an error listing the supported ones.
    pub fn from_name(name: &str) -> Result<Self, LoadError> {
        Self::ALL.into_iter().find(|f| f.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
            LoadError::Unsupported(format!("architecture {name:?} (supported: {})", known.join(", ")))
        })
    }

    /// How q/k rows pair up for RoPE in llama.cpp's files. Hugging Face checkpoints are
    /// always rotate-half; llama.cpp's converter permutes only LLaMA's q/k rows.
    pub fn gguf_rope(self) -> RopeStyle {
        match self {
            Self::Llama => RopeStyle::Interleaved,
            Self::Qwen2 | Self::Qwen3 => RopeStyle::Halves,
        }
    }

    /// Every layer has q/k/v biases whatever the config says (Qwen2 has no switch).
    pub fn always_qkv_bias(self) -> bool {
        self == Self::Qwen2
    }

    /// Queries and keys go through a per-head RMSNorm before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Self::Qwen3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_named() {
        for f in Family::ALL {
            assert_eq!(Family::from_name(f.name()).unwrap(), f);
        }
        let e = Family::from_name("gemma3").unwrap_err().to_string();
        assert!(e.contains("\"gemma3\"") && e.contains("qwen3"), "{e}");
    }
}
