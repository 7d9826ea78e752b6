//! `vidllm-native` as a library: the command-line front ends (`vidllm-native`'s
//! subcommands) and the serving engine, which the Python bindings (`python/`) drive too.

use clap::Args;
use vidllm_models::KvChoice;
use vidllm_models::layers::TowerWeights;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::video_model::LoadOptions;
use vidllm_shaders::cpu_int::ActBits;
use vidllm_shaders::device::{DeviceChoice, Picked, Placement};

pub mod ask;
pub mod batch;
pub mod bench;
pub mod chat;
pub mod engine;
pub mod frames;
pub mod inspect;
pub mod live;
pub mod metrics;
pub mod openai;
pub mod progress;
pub mod runtime;
pub mod serve;
pub mod video;
pub mod watch;

/// How a model folder's matrices are stored on the device: the flags of every command that
/// loads one. A GGUF file (or pair) keeps the types it was written with, and refuses them
/// (`runtime::load`, `runtime::load_video`).
#[derive(Args, Clone, Default)]
pub struct StorageArgs {
    /// q4_0 | q4_1 | q8_0 | f16 | f32: a folder's decoder storage on the device (default
    /// q4_1). A GGUF file keeps its own types.
    #[arg(long)]
    pub quant: Option<QuantChoice>,
    /// f32 | q8_0: how a folder's vision towers store their attention and MLP matrices
    /// (default f32, transformers' arithmetic). q8_0 quantises them on load to llama.cpp's
    /// Q8_0 blocks, which the CPU multiplies about twice as fast. A GGUF pair keeps its
    /// mmproj's types.
    #[arg(long)]
    pub vision_quant: Option<TowerWeights>,
    /// int16 | int8: how the CPU's products of quantised matrices quantise each row of
    /// activations, per block of 32 (default int16, within 1/65534 of the row's largest
    /// value, which keeps the CPU's answers with the f32 references). int8 is llama.cpp's
    /// arithmetic (its `q8_0` / `q8_1` activations): prefill and vision towers about 1.4-1.6x
    /// faster on AVX-512 VNNI, at llama.cpp's precision. The CPU backend only.
    #[arg(long, default_value = "int16")]
    pub activations: ActBits,
}

impl StorageArgs {
    /// Whether either flag was given.
    pub fn given(&self) -> bool {
        self.quant.is_some() || self.vision_quant.is_some()
    }

    /// Where a model loads on `picked`, its products' activations as `--activations` says.
    ///
    /// # Errors
    /// `--activations int8` on a GPU, whose kernels take f32 activations.
    pub fn placement(&self, picked: &Picked) -> anyhow::Result<Placement> {
        if picked.is_gpu && self.activations != ActBits::Int16 {
            anyhow::bail!("--activations applies to the CPU backend (--device cpu): {} multiplies f32 activations", picked.name);
        }
        Ok(picked.placement().with_activations(self.activations))
    }

    /// `opts` with the decoder's and the towers' storage these flags (or their defaults) say.
    pub fn apply(&self, opts: LoadOptions) -> LoadOptions {
        LoadOptions { quant: self.quant.unwrap_or(QuantChoice::Q4_1), tower: self.vision_quant.unwrap_or_default(), ..opts }
    }
}

/// Options shared by every command that runs the model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file, or a Hugging Face text-model folder (`llama`, `qwen2`, `qwen3`);
    /// `serve` and `batch` also take what `ask` takes (a video-language folder, or a GGUF
    /// with `--mmproj`).
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Where to run: a hardware GPU if present (auto), wgpu on any adapter (gpu), or the CPU.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Context length (tokens) to allocate; defaults to the model's, at most 4096.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// What the KV cache keeps keys and values in: auto | f32 | f16 | q8_0 | q4_0
    /// (llama.cpp's `--cache-type-k/-v`; the quantised types rotated first, as llama.cpp
    /// does). auto: f16 where the decoder's heads are whole 32-value blocks, else f32.
    #[arg(long, default_value = "auto")]
    pub kv: KvChoice,
}

/// On a headless machine the window-system probe inside the GPU stack prints
/// "error: XDG_RUNTIME_DIR is invalid" when that variable is unset; give it a private
/// empty directory so only vidllm's own errors start with `error:`.
pub fn quiet_headless_probe() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join("vidllm-runtime");
    if std::fs::create_dir_all(&dir).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        // SAFETY: called first thing (in `main`, or when the Python module loads), before
        // this process starts a thread of its own.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
}
