//! ViViT (Arnab et al. 2021, "ViViT: A Video Vision Transformer"), the unfactorised model
//! with tubelet embedding; reference: transformers `models/vivit/modeling_vivit.py`
//! (`VivitModel`).
//!
//! The clip is cut into tubelets (`tubelet_size` = frames x rows x columns, 2 x 16 x 16 for
//! ViViT-B 16x2), each embedded by a strided 3-D conv with bias, ordered time-major then
//! row-major; a class token leads; learned positions cover all of them; pre-norm blocks
//! attend over the whole clip at once; a final LayerNorm closes the tower.

use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::device::{BindingCap, Placement};

use crate::clip::{Activation, AttentionProbe, BlockNames, ClipVisionConfig, EncoderLayer};
use crate::layers::{LayerNorm, TowerWeights, vector};

/// A `VivitConfig` as written in `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VivitConfigJson {
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub hidden_act: Option<String>,
    pub layer_norm_eps: Option<f64>,
    pub image_size: Option<usize>,
    pub num_frames: Option<usize>,
    pub tubelet_size: Option<[usize; 3]>,
    pub num_channels: Option<usize>,
    pub qkv_bias: Option<bool>,
}

const BLOCK: BlockNames = BlockNames {
    ln1: "layernorm_before",
    q: "attention.attention.query",
    k: "attention.attention.key",
    v: "attention.attention.value",
    o: "attention.output.dense",
    ln2: "layernorm_after",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    layer_scale: None,
};

pub struct VivitTower {
    pub cfg: ClipVisionConfig,
    /// Frames a clip must have.
    pub frames: usize,
    /// `[kt, kh, kw]`
    pub tubelet: [usize; 3],
    /// `[3 * kt * kh * kw, d]`: the tubelet conv as a matmul.
    patch_t: Tensor<2>,
    patch_bias: Tensor<1>,
    class: Tensor<1>,
    /// `[tokens, d]`
    positions: Tensor<2>,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    cap: BindingCap,
}

impl VivitTower {
    /// Load `{prefix}embeddings.*`, `{prefix}encoder.layer.{i}.*` and `{prefix}layernorm.*`.
    pub fn load(ck: &Checkpoint, prefix: &str, j: &VivitConfigJson, weights: TowerWeights, at: &Placement) -> Result<Self, LoadError> {
        let d = j.hidden_size.unwrap_or(768);
        let tubelet = j.tubelet_size.unwrap_or([2, 16, 16]);
        let frames = j.num_frames.unwrap_or(32);
        let cfg = ClipVisionConfig {
            d_model: d,
            d_ff: j.intermediate_size.unwrap_or(3072),
            n_layers: j.num_hidden_layers.unwrap_or(12),
            n_heads: j.num_attention_heads.unwrap_or(12),
            image_size: j.image_size.unwrap_or(224),
            patch_size: tubelet[1],
            act: Activation::parse(j.hidden_act.as_deref().unwrap_or("gelu_fast"))?,
            eps: j.layer_norm_eps.unwrap_or(1e-6),
            weights,
        };
        let [kt, kh, kw] = tubelet;
        if j.qkv_bias == Some(false)
            || j.num_channels.unwrap_or(3) != 3
            || kh != kw
            || tubelet.contains(&0)
            || !frames.is_multiple_of(kt)
            || !cfg.image_size.is_multiple_of(kh)
            || cfg.n_heads == 0
            || !d.is_multiple_of(cfg.n_heads)
        {
            return Err(LoadError::Unsupported(format!(
                "ViViT config: {frames} frames of {} px in tubelets {tubelet:?}, hidden_size {d} / {} heads, qkv_bias {:?} \
                 (whole square tubelets, 3 channels, biased attention)",
                cfg.image_size, cfg.n_heads, j.qkv_bias
            )));
        }
        let device = &at.device;
        let name = |s: &str| format!("{prefix}{s}");
        let k = 3 * kt * kh * kw;
        let w = ck.f32_shaped(&name("embeddings.patch_embeddings.projection.weight"), &[d, 3, kt, kh, kw])?;
        let patch_t = Tensor::<2>::from_data(TensorData::new(w, [d, k]), device).transpose();
        let patch_bias = vector(ck, &name("embeddings.patch_embeddings.projection.bias"), d, device)?;
        let cls = ck.f32_shaped(&name("embeddings.cls_token"), &[1, 1, d])?;
        let n = 1 + (frames / kt) * cfg.grid() * cfg.grid();
        let pos = ck.f32_shaped(&name("embeddings.position_embeddings"), &[1, n, d])?;
        Ok(Self {
            frames,
            tubelet,
            patch_t,
            patch_bias,
            class: Tensor::from_data(TensorData::new(cls, [d]), device),
            positions: Tensor::from_data(TensorData::new(pos, [n, d]), device),
            layers: (0..cfg.n_layers)
                .map(|i| EncoderLayer::load_named(ck, &name(&format!("encoder.layer.{i}.")), &BLOCK, &cfg, at))
                .collect::<Result<Vec<_>, LoadError>>()?,
            final_ln: LayerNorm::load(ck, &name("layernorm"), d, cfg.eps, device)?,
            cfg,
            cap: at.cap,
        })
    }

    /// Temporal steps of a clip (frames over the tubelet's depth).
    pub fn steps(&self) -> usize {
        self.frames / self.tubelet[0]
    }

    /// Tokens of a clip, class token included.
    pub fn tokens(&self) -> usize {
        1 + self.steps() * self.cfg.grid() * self.cfg.grid()
    }

    /// `last_hidden_state`: every block, then the final LayerNorm; class token first, then
    /// tubelets time-major, row-major.
    ///
    /// # Shapes
    /// - pixels: `[frames, 3, s, s]` (one clip) -> `[tokens, d]`
    pub fn forward(&self, pixels: Tensor<4>) -> Result<Tensor<2>, LoadError> {
        Ok(self.run(pixels, false)?.0)
    }

    /// [`VivitTower::forward`] and the attention probe of its last block (FastVID's
    /// salience), `[1, tokens, d]` each.
    pub fn forward_probed(&self, pixels: Tensor<4>) -> Result<(Tensor<2>, Option<AttentionProbe>), LoadError> {
        self.run(pixels, true)
    }

    fn run(&self, pixels: Tensor<4>, probe: bool) -> Result<(Tensor<2>, Option<AttentionProbe>), LoadError> {
        let [t, _, h, w] = pixels.dims();
        let s = self.cfg.image_size;
        if t != self.frames || h != s || w != s {
            return Err(LoadError::Unsupported(format!("ViViT takes clips of {} frames of {s} x {s}, not {t} of {h} x {w}", self.frames)));
        }
        let n = self.tokens();
        // The whole clip is one sequence: its scores `[heads, n, n]` are taken a block of
        // query rows at a time where they would not fit one storage binding.
        let rows = self.cap.per_binding(4 * self.cfg.n_heads * n, 0).min(n);
        let mut x = self.embed(pixels);
        let mut seen = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if probe && i + 1 == self.layers.len() {
                seen = Some(layer.probe(x.clone(), 1, n, &self.cfg));
            }
            x = layer.forward_rows(x, 1, n, &self.cfg, rows);
        }
        Ok((self.final_ln.forward(x), seen))
    }

    /// # Shapes
    /// - pixels: `[frames, 3, s, s]` -> `[tokens, d]`
    fn embed(&self, pixels: Tensor<4>) -> Tensor<2> {
        let [kt, k, _] = self.tubelet;
        let (st, g, d) = (self.steps(), self.cfg.grid(), self.cfg.d_model);
        // [t, c, y, x] -> tubelets [st, gy, gx] of [c, kt, ky, kx], as the conv's weight is laid out.
        let tubes = pixels
            .reshape([st, kt, 3, g, k, g, k])
            .permute([0, 3, 5, 2, 1, 4, 6]) // [st, gy, gx, c, kt, ky, kx]
            .reshape([st * g * g, 3 * kt * k * k]);
        let x = tubes.matmul(self.patch_t.clone()) + self.patch_bias.clone().unsqueeze::<2>();
        let cls = self.class.clone().reshape([1, d]);
        Tensor::cat(vec![cls, x], 0) + self.positions.clone()
    }
}
