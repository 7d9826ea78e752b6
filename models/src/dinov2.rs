//! DINOv2 with registers (Oquab et al. 2024, "DINOv2: Learning Robust Visual Features
//! without Supervision"; Darcet et al. 2024, "Vision Transformers Need Registers");
//! reference: transformers `models/dinov2_with_registers/modeling_dinov2_with_registers.py`
//! and timm's `vit_large_patch14_reg4_dinov2` (which MERV uses).
//!
//! Patches (a strided conv with bias), a class token, learned positions for the class
//! token and the patches, then the register tokens inserted between them **without**
//! positions, then pre-norm blocks whose two residual branches are scaled per channel
//! (layer scale). The published table is for 518 px (37 x 37 patches); at other sizes it
//! is resampled once at load, bicubic with antialiasing, as timm does when it loads the
//! checkpoint at 224 px (16 x 16).

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;
use vidllm_core::LoadError;
use vidllm_core::preprocess::{Resample, resample_weights};
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::device::{BindingCap, Placement};

use crate::clip::{Activation, AttentionProbe, BlockNames, ClipVisionConfig, EncoderLayer};
use crate::layers::{TowerWeights, vector};

/// A `Dinov2WithRegistersConfig` as written in `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Dinov2ConfigJson {
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub mlp_ratio: Option<f64>,
    pub hidden_act: Option<String>,
    pub layer_norm_eps: Option<f64>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub num_channels: Option<usize>,
    pub qkv_bias: Option<bool>,
    pub num_register_tokens: Option<usize>,
    pub use_swiglu_ffn: Option<bool>,
}

const BLOCK: BlockNames = BlockNames {
    ln1: "norm1",
    q: "attention.attention.query",
    k: "attention.attention.key",
    v: "attention.attention.value",
    o: "attention.output.dense",
    ln2: "norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    layer_scale: Some(("layer_scale1.lambda1", "layer_scale2.lambda1")),
};

pub struct Dinov2Tower {
    /// The tower's shape at the size it is run at (`image_size` is the input side).
    pub cfg: ClipVisionConfig,
    pub registers: usize,
    /// `[3 * p * p, d]`
    patch_t: Tensor<2>,
    patch_bias: Tensor<1>,
    /// `[d]`: the class token plus its position.
    class: Tensor<1>,
    /// `[registers, d]`
    register_tokens: Tensor<2>,
    /// `[grid * grid, d]`: the patches' positions at the input size.
    positions: Tensor<2>,
    layers: Vec<EncoderLayer>,
    cap: BindingCap,
}

impl Dinov2Tower {
    /// Load `{prefix}embeddings.*` and `{prefix}encoder.layer.{i}.*` (the final
    /// `layernorm` is not read: MERV takes an inner block's output), for `input_size`
    /// pixel frames.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        j: &Dinov2ConfigJson,
        input_size: usize,
        weights: TowerWeights,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        if j.use_swiglu_ffn == Some(true) || j.qkv_bias == Some(false) || j.num_channels.unwrap_or(3) != 3 {
            return Err(LoadError::Unsupported(
                "DINOv2 config: SwiGLU feed-forward, attention without biases or other than 3 channels".into(),
            ));
        }
        let d = j.hidden_size.unwrap_or(768);
        let p = j.patch_size.unwrap_or(14);
        let table_side = j.image_size.unwrap_or(518) / p.max(1);
        let cfg = ClipVisionConfig {
            d_model: d,
            d_ff: (d as f64 * j.mlp_ratio.unwrap_or(4.0)) as usize,
            n_layers: j.num_hidden_layers.unwrap_or(12),
            n_heads: j.num_attention_heads.unwrap_or(12),
            image_size: input_size,
            patch_size: p,
            act: Activation::parse(j.hidden_act.as_deref().unwrap_or("gelu"))?,
            eps: j.layer_norm_eps.unwrap_or(1e-6),
            weights,
        };
        if p == 0 || !input_size.is_multiple_of(p) || cfg.n_heads == 0 || !d.is_multiple_of(cfg.n_heads) || table_side == 0 {
            return Err(LoadError::Unsupported(format!(
                "DINOv2 config: input {input_size} px / patch {p}, hidden_size {d} / {} heads",
                cfg.n_heads
            )));
        }
        let device = &at.device;
        let name = |s: &str| format!("{prefix}{s}");
        let w = ck.f32_shaped(&name("embeddings.patch_embeddings.projection.weight"), &[d, 3, p, p])?;
        let patch_t = Tensor::<2>::from_data(TensorData::new(w, [d, 3 * p * p]), device).transpose();
        let patch_bias = vector(ck, &name("embeddings.patch_embeddings.projection.bias"), d, device)?;
        let registers = j.num_register_tokens.unwrap_or(4);
        let regs = ck.f32_shaped(&name("embeddings.register_tokens"), &[1, registers, d])?;
        let register_tokens = Tensor::from_data(TensorData::new(regs, [registers, d]), device);
        let table = ck.f32_shaped(&name("embeddings.position_embeddings"), &[1, 1 + table_side * table_side, d])?;
        let cls = ck.f32_shaped(&name("embeddings.cls_token"), &[1, 1, d])?;
        let class: Vec<f32> = cls.iter().zip(&table[..d]).map(|(c, q)| c + q).collect();
        let g = cfg.grid();
        let positions = resample_grid(&table[d..], table_side, g, d);
        Ok(Self {
            registers,
            patch_t,
            patch_bias,
            class: Tensor::from_data(TensorData::new(class, [d]), device),
            register_tokens,
            positions: Tensor::from_data(TensorData::new(positions, [g * g, d]), device),
            layers: (0..cfg.n_layers)
                .map(|i| EncoderLayer::load_named(ck, &name(&format!("encoder.layer.{i}.")), &BLOCK, &cfg, at))
                .collect::<Result<Vec<_>, LoadError>>()?,
            cfg,
            cap: at.cap,
        })
    }

    /// Tokens per frame: class, registers, patches.
    pub fn tokens(&self) -> usize {
        1 + self.registers + self.cfg.grid() * self.cfg.grid()
    }

    /// The output of the first `blocks` blocks (transformers' `hidden_states[blocks]`),
    /// every token kept: class, registers, then patches row-major.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t, tokens, d]`
    pub fn hidden_state(&self, pixels: Tensor<4>, blocks: usize) -> Tensor<3> {
        self.run(pixels, blocks, false).0
    }

    /// [`Dinov2Tower::hidden_state`] and the attention probe of its last block (FastVID's
    /// salience; none for `blocks` 0).
    pub fn hidden_state_probed(&self, pixels: Tensor<4>, blocks: usize) -> (Tensor<3>, Option<AttentionProbe>) {
        self.run(pixels, blocks, true)
    }

    fn run(&self, pixels: Tensor<4>, blocks: usize, probe: bool) -> (Tensor<3>, Option<AttentionProbe>) {
        let t = pixels.dims()[0];
        let (n, d, c) = (self.tokens(), self.cfg.d_model, &self.cfg);
        let batch = self.cap.per_binding(4 * (c.n_heads * n * n).max(n * c.d_ff), 0);
        if t > batch {
            return AttentionProbe::joined_batches(
                (0..t).step_by(batch).map(|s| self.run(pixels.clone().narrow(0, s, batch.min(t - s)), blocks, probe)),
            );
        }
        let mut x = self.embed(pixels);
        let mut seen = None;
        for (i, layer) in self.layers[..blocks].iter().enumerate() {
            if probe && i + 1 == blocks {
                seen = Some(layer.probe(x.clone(), t, n, c));
            }
            x = layer.forward(x, t, n, c);
        }
        (x.reshape([t, n, d]), seen)
    }

    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t * tokens, d]`
    fn embed(&self, pixels: Tensor<4>) -> Tensor<2> {
        let [t, _, _, _] = pixels.dims();
        let (g, p, d, r) = (self.cfg.grid(), self.cfg.patch_size, self.cfg.d_model, self.registers);
        let patches = pixels
            .reshape([t, 3, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5]) // [t, gy, gx, c, py, px]
            .reshape([t * g * g, 3 * p * p]);
        let x = patches.matmul(self.patch_t.clone()) + self.patch_bias.clone().unsqueeze::<2>();
        let x = x.reshape([t, g * g, d]) + self.positions.clone().unsqueeze::<3>();
        let cls = self.class.clone().reshape([1, 1, d]).expand([t, 1, d]);
        let regs = self.register_tokens.clone().unsqueeze::<3>().expand([t, r, d]);
        Tensor::cat(vec![cls, regs, x], 1).reshape([t * self.tokens(), d])
    }

    pub fn device(&self) -> Device {
        self.patch_t.device()
    }
}

/// A `from x from` grid of `d`-vectors (row-major) resampled to `to x to`: bicubic with
/// antialiasing (PIL's and torch's `antialias=True` filter, a = -0.5), as timm's
/// `resample_abs_pos_embed` does it.
pub fn resample_grid(table: &[f32], from: usize, to: usize, d: usize) -> Vec<f32> {
    if from == to {
        return table.to_vec();
    }
    let w = resample_weights(from, to, 0..to, Resample::Bicubic); // [to, from]
    // Columns first, then rows; f64 sums.
    let mut cols = vec![0f64; from * to * d];
    for y in 0..from {
        for x in 0..to {
            for k in 0..from {
                let c = w[x * from + k] as f64;
                if c != 0.0 {
                    let src = &table[(y * from + k) * d..][..d];
                    let dst = &mut cols[(y * to + x) * d..][..d];
                    dst.iter_mut().zip(src).for_each(|(o, &v)| *o += c * v as f64);
                }
            }
        }
    }
    let mut out = vec![0f64; to * to * d];
    for y in 0..to {
        for k in 0..from {
            let c = w[y * from + k] as f64;
            if c != 0.0 {
                for x in 0..to {
                    let src = &cols[(k * to + x) * d..][..d];
                    let dst = &mut out[(y * to + x) * d..][..d];
                    dst.iter_mut().zip(src).for_each(|(o, &v)| *o += c * v);
                }
            }
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}
