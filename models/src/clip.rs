//! CLIP vision tower (Radford et al. 2021, "Learning Transferable Visual Models From
//! Natural Language Supervision"); reference: transformers `models/clip/modeling_clip.py`
//! (`CLIPVisionTransformer`).
//!
//! Patches (a strided conv without bias, computed as a matmul over unfolded patches), a
//! class token, learned positions, `pre_layrnorm`, then pre-norm encoder blocks.
//! `hidden_states[0]` is the pre-norm embedding, `hidden_states[k]` the output of block k.

use burn::tensor::activation::gelu;
use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::device::{BindingCap, Placement};
use vidllm_shaders::{Mask, attention, gelu_sigmoid};

use crate::layers::{LayerNorm, Linear, TowerWeights, vector};

/// A ViT `vision_config` as written in `config.json` (CLIP's, SigLIP's and SmolVLM's
/// share these fields; their defaults differ, see [`VisionDefaults`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfigJson {
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub hidden_act: Option<String>,
    pub layer_norm_eps: Option<f64>,
    pub num_channels: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, CLIP's default.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, SigLIP's; `gelu_fast`, ViViT's, is
    /// the same function written another way).
    GeluTanh,
}

impl Activation {
    pub fn parse(s: &str) -> Result<Self, LoadError> {
        match s {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Self::GeluTanh),
            other => Err(LoadError::Unsupported(format!(
                "activation {other:?} (supported: quick_gelu, gelu, gelu_pytorch_tanh, gelu_new, gelu_fast)"
            ))),
        }
    }

    pub fn forward(self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::QuickGelu => gelu_sigmoid(x, 1.702, 0.0),
            Self::Gelu => gelu(x),
            // 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), is x sigmoid(2 u):
            // one kernel, where burn's tanh and power were a libm call each per element on
            // the CPU (an eighth of a SigLIP tower's time) and seven passes in all.
            Self::GeluTanh => gelu_sigmoid(x, (2.0 * (2.0 / std::f64::consts::PI).sqrt()) as f32, 0.044_715),
        }
    }
}

/// Resolved tower configuration (transformers' defaults filled in).
#[derive(Debug, Clone)]
pub struct ClipVisionConfig {
    pub d_model: usize,
    pub d_ff: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub act: Activation,
    pub eps: f64,
    /// How the blocks' linear layers are stored: a load option (`LoadOptions::tower`),
    /// not the checkpoint's; f32 unless the architecture is told otherwise.
    pub weights: TowerWeights,
}

/// transformers' defaults for the fields a `vision_config` leaves out; they differ per
/// config class (`CLIPVisionConfig`, `SiglipVisionConfig`, `SmolVLMVisionConfig`).
pub struct VisionDefaults {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: &'static str,
    pub layer_norm_eps: f64,
}

impl VisionDefaults {
    /// `CLIPVisionConfig()`.
    pub const CLIP: Self =
        Self { hidden_size: 768, num_attention_heads: 12, image_size: 224, patch_size: 32, hidden_act: "quick_gelu", layer_norm_eps: 1e-5 };
}

impl ClipVisionConfigJson {
    /// The tower's shape, fields left out taken from `d`; refused (naming the fields) unless
    /// the image is whole patches, the width whole heads, and there are 3 channels.
    pub fn resolve(&self, d: &VisionDefaults) -> Result<ClipVisionConfig, LoadError> {
        let c = ClipVisionConfig {
            d_model: self.hidden_size.unwrap_or(d.hidden_size),
            d_ff: self.intermediate_size.unwrap_or(3072),
            n_layers: self.num_hidden_layers.unwrap_or(12),
            n_heads: self.num_attention_heads.unwrap_or(d.num_attention_heads),
            image_size: self.image_size.unwrap_or(d.image_size),
            patch_size: self.patch_size.unwrap_or(d.patch_size),
            act: Activation::parse(self.hidden_act.as_deref().unwrap_or(d.hidden_act))?,
            eps: self.layer_norm_eps.unwrap_or(d.layer_norm_eps),
            weights: TowerWeights::F32,
        };
        if self.num_channels.unwrap_or(3) != 3
            || c.patch_size == 0
            || !c.image_size.is_multiple_of(c.patch_size)
            || c.n_heads == 0
            || !c.d_model.is_multiple_of(c.n_heads)
        {
            return Err(LoadError::Unsupported(format!(
                "vision_config: image_size {} / patch_size {}, hidden_size {} / num_attention_heads {}, num_channels {:?} \
                 (the image must be whole patches, the width whole heads, 3 channels)",
                c.image_size, c.patch_size, c.d_model, c.n_heads, self.num_channels
            )));
        }
        Ok(c)
    }
}

impl TryFrom<&ClipVisionConfigJson> for ClipVisionConfig {
    type Error = LoadError;
    fn try_from(j: &ClipVisionConfigJson) -> Result<Self, LoadError> {
        j.resolve(&VisionDefaults::CLIP)
    }
}

impl ClipVisionConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image, class token included.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// The tensor names of a pre-norm ViT block, relative to the block's prefix: CLIP's and
/// SigLIP's (`layer_norm1`, `self_attn.q_proj`, ...), DINOv2's and ViViT's (`norm1` /
/// `layernorm_before`, `attention.attention.query`, ...). The maths is the same.
pub(crate) struct BlockNames {
    pub ln1: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub o: &'static str,
    pub ln2: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    /// DINOv2's per-channel residual scales (`layer_scale{1,2}.lambda1`), when present.
    pub layer_scale: Option<(&'static str, &'static str)>,
}

impl BlockNames {
    /// CLIP's and SigLIP's (`CLIPEncoderLayer`).
    pub const CLIP: Self = Self {
        ln1: "layer_norm1",
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
        o: "self_attn.out_proj",
        ln2: "layer_norm2",
        fc1: "mlp.fc1",
        fc2: "mlp.fc2",
        layer_scale: None,
    };
}

/// Multi-head self-attention with biased projections, every token seeing every token of
/// its sequence (no mask).
pub(crate) struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

impl SelfAttention {
    pub(crate) fn load(
        ck: &Checkpoint,
        [q, k, v, o]: [String; 4],
        d: usize,
        weights: TowerWeights,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            q: Linear::load_as(ck, &q, d, d, weights, at)?,
            k: Linear::load_as(ck, &k, d, d, weights, at)?,
            v: Linear::load_as(ck, &v, d, d, weights, at)?,
            o: Linear::load_as(ck, &o, d, d, weights, at)?,
        })
    }

    /// # Shapes
    /// - x: `[t * n, d]` (t sequences of n tokens) -> same
    pub(crate) fn forward(&self, x: Tensor<2>, t: usize, n: usize, heads: usize) -> Tensor<2> {
        self.forward_rows(x, t, n, heads, n)
    }

    /// [`SelfAttention::forward`] taking at most `rows` queries at a time, so that the
    /// scores of one long sequence (ViViT's whole clip) fit a storage binding.
    pub(crate) fn forward_rows(&self, x: Tensor<2>, t: usize, n: usize, heads: usize, rows: usize) -> Tensor<2> {
        let d = x.dims()[1];
        let dh = d / heads;
        let split = |y: Tensor<2>| y.reshape([t, n, heads, dh]).swap_dims(1, 2); // [t, h, n, dh]
        let q = split(self.q.forward(x.clone()));
        let k = split(self.k.forward(x.clone()));
        let v = split(self.v.forward(x));
        // Every token sees every token: no mask, and the bias is not read.
        let unused = Tensor::zeros([1, 1, 1, 1], &q.device());
        let scale = (dh as f64).powf(-0.5);
        let rows = rows.clamp(1, n);
        let ctx = match rows == n {
            true => attention(q, k, v, unused, scale, Mask::None),
            false => {
                let parts = (0..n).step_by(rows).map(|s| {
                    let qs = q.clone().narrow(2, s, rows.min(n - s));
                    attention(qs, k.clone(), v.clone(), unused.clone(), scale, Mask::None)
                });
                Tensor::cat(parts.collect(), 2)
            }
        };
        self.o.forward(ctx.swap_dims(1, 2).reshape([t * n, d]))
    }
}

/// The query and key projections of a tower's feature block (the last block whose output
/// the features are), over its input: what FastVID's salience reads from the vision tower
/// ([`crate::fastvid::tower_salience`]), as the authors' code reads it from the last vision
/// block. Each image's tokens may then be pooled as the connector pools the features
/// ([`AttentionProbe::pooled`]).
///
/// # Shapes
/// - q, k: `[images, tokens, d]` (heads side by side, as the projections give them)
#[derive(Clone)]
pub struct AttentionProbe {
    pub q: Tensor<3>,
    pub k: Tensor<3>,
    pub heads: usize,
}

impl AttentionProbe {
    /// Both projections through the same token pooling.
    pub fn pooled(self, pool: impl Fn(Tensor<3>) -> Tensor<3>) -> Self {
        Self { q: pool(self.q), k: pool(self.k), heads: self.heads }
    }

    /// Batches of images' hidden states, each with its probe where asked for, in order,
    /// as one (a tower that encodes its images a batch at a time).
    pub(crate) fn joined_batches(batches: impl IntoIterator<Item = (Tensor<3>, Option<Self>)>) -> (Tensor<3>, Option<Self>) {
        let (parts, probes): (Vec<_>, Vec<_>) = batches.into_iter().unzip();
        let probes: Option<Vec<Self>> = probes.into_iter().collect();
        (Tensor::cat(parts, 0), probes.map(Self::cat))
    }

    /// Probes of batches of images, in order.
    pub(crate) fn cat(parts: Vec<Self>) -> Self {
        let heads = parts[0].heads;
        let (q, k) = parts.into_iter().map(|p| (p.q, p.k)).unzip();
        Self { q: Tensor::cat(q, 0), k: Tensor::cat(k, 0), heads }
    }
}

/// One pre-norm transformer block of a ViT (CLIP, SigLIP, DINOv2, ViViT):
/// `x + ls1 * attn(ln1(x))`, then `h + ls2 * fc2(act(fc1(ln2(h))))`, the layer scales
/// `ls` being 1 except in DINOv2.
pub(crate) struct EncoderLayer {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// `[d]` each
    layer_scale: Option<(Tensor<1>, Tensor<1>)>,
}

pub struct ClipVisionTower {
    pub cfg: ClipVisionConfig,
    /// `[3 * p * p, d_model]`: the patch conv as a matmul over unfolded patches.
    patch_t: Tensor<2>,
    class: Tensor<1>,
    /// `[tokens, d_model]`
    positions: Tensor<2>,
    pre_ln: LayerNorm,
    pub(crate) layers: Vec<EncoderLayer>,
    /// The binding cap of its device: frames are encoded in batches under it.
    cap: BindingCap,
}

impl ClipVisionTower {
    /// Load from `{prefix}embeddings.*`, `{prefix}pre_layrnorm.*`, `{prefix}encoder.layers.*`.
    pub fn load(ck: &Checkpoint, prefix: &str, cfg: ClipVisionConfig, at: &Placement) -> Result<Self, LoadError> {
        let device = &at.device;
        let (d, p) = (cfg.d_model, cfg.patch_size);
        let name = |s: &str| format!("{prefix}{s}");
        let w = ck.f32_shaped(&name("embeddings.patch_embedding.weight"), &[d, 3, p, p])?;
        let patch_t = Tensor::<2>::from_data(TensorData::new(w, [d, 3 * p * p]), device).transpose();
        let class = vector(ck, &name("embeddings.class_embedding"), d, device)?;
        let pos = ck.f32_shaped(&name("embeddings.position_embedding.weight"), &[cfg.tokens(), d])?;
        let positions = Tensor::from_data(TensorData::new(pos, [cfg.tokens(), d]), device);
        let pre_ln = LayerNorm::load(ck, &name("pre_layrnorm"), d, cfg.eps, device)?;
        let layers = (0..cfg.n_layers)
            .map(|i| EncoderLayer::load(ck, &name(&format!("encoder.layers.{i}.")), &cfg, at))
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(Self { cfg, patch_t, class, positions, pre_ln, layers, cap: at.cap })
    }

    /// Patch + class + position embeddings, then `pre_layrnorm` (= `hidden_states[0]`).
    ///
    /// # Shapes
    /// - pixels: `[t, 3, h, w]` -> `[t * tokens, d_model]`
    pub(crate) fn embed(&self, pixels: Tensor<4>) -> Tensor<2> {
        let [t, _, _, _] = pixels.dims();
        let (g, p, d) = (self.cfg.grid(), self.cfg.patch_size, self.cfg.d_model);
        let patches = pixels
            .reshape([t, 3, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5]) // [t, gy, gx, c, py, px]
            .reshape([t * g * g, 3 * p * p]);
        let x = patches.matmul(self.patch_t.clone()).reshape([t, g * g, d]);
        let cls = self.class.clone().reshape([1, 1, d]).expand([t, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1) + self.positions.clone().unsqueeze::<3>();
        self.pre_ln.forward(x.reshape([t * (g * g + 1), d]))
    }

    /// `hidden_states[index]` (0 = embeddings, k = after block k), every token kept.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, h, w]` -> `[t, tokens, d_model]`
    pub fn hidden_state(&self, pixels: Tensor<4>, index: usize) -> Tensor<3> {
        self.run(pixels, index, false).0
    }

    /// [`ClipVisionTower::hidden_state`] and the attention probe of block `index`, the
    /// block that makes it (none for the embeddings, `index` 0).
    ///
    /// # Shapes
    /// - pixels: `[t, 3, h, w]` -> `[t, tokens, d_model]`, probe `[t, tokens, d_model]` each
    pub fn hidden_state_probed(&self, pixels: Tensor<4>, index: usize) -> (Tensor<3>, Option<AttentionProbe>) {
        self.run(pixels, index, true)
    }

    fn run(&self, pixels: Tensor<4>, index: usize, probe: bool) -> (Tensor<3>, Option<AttentionProbe>) {
        let t = pixels.dims()[0];
        let batch = self.frames_per_batch();
        if t > batch {
            // Frames are independent: encode them in batches whose attention scores
            // fit one storage binding, then put the batches back together.
            return AttentionProbe::joined_batches(
                (0..t).step_by(batch).map(|s| self.run(pixels.clone().narrow(0, s, batch.min(t - s)), index, probe)),
            );
        }
        let n = self.cfg.tokens();
        let mut x = self.embed(pixels);
        let mut seen = None;
        for (i, layer) in self.layers[..index].iter().enumerate() {
            if probe && i + 1 == index {
                seen = Some(layer.probe(x.clone(), t, n, &self.cfg));
            }
            x = layer.forward(x, t, n, &self.cfg);
        }
        (x.reshape([t, n, self.cfg.d_model]), seen)
    }

    /// Frames encoded together: as many as keep the largest activation, the attention
    /// scores `[frames, heads, n, n]` or the MLP's `[frames * n, intermediate]`, within
    /// one storage binding.
    pub(crate) fn frames_per_batch(&self) -> usize {
        let (c, n) = (&self.cfg, self.cfg.tokens());
        self.cap.per_binding(4 * (c.n_heads * n * n).max(n * c.d_ff), 0)
    }
}

impl EncoderLayer {
    /// Load `{prefix}layer_norm1`, `{prefix}self_attn.*`, `{prefix}layer_norm2`, `{prefix}mlp.*`.
    pub(crate) fn load(ck: &Checkpoint, prefix: &str, cfg: &ClipVisionConfig, at: &Placement) -> Result<Self, LoadError> {
        Self::load_named(ck, prefix, &BlockNames::CLIP, cfg, at)
    }

    /// Load a block whose tensors are named by `names` under `prefix`.
    pub(crate) fn load_named(
        ck: &Checkpoint,
        prefix: &str,
        names: &BlockNames,
        cfg: &ClipVisionConfig,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        let (d, l, device, w) = (cfg.d_model, |s: &str| format!("{prefix}{s}"), &at.device, cfg.weights);
        let layer_scale = match names.layer_scale {
            Some((a, b)) => Some((vector(ck, &l(a), d, device)?, vector(ck, &l(b), d, device)?)),
            None => None,
        };
        Ok(Self {
            ln1: LayerNorm::load(ck, &l(names.ln1), d, cfg.eps, device)?,
            attn: SelfAttention::load(ck, [l(names.q), l(names.k), l(names.v), l(names.o)], d, w, at)?,
            ln2: LayerNorm::load(ck, &l(names.ln2), d, cfg.eps, device)?,
            fc1: Linear::load_as(ck, &l(names.fc1), cfg.d_ff, d, w, at)?,
            fc2: Linear::load_as(ck, &l(names.fc2), d, cfg.d_ff, w, at)?,
            layer_scale,
        })
    }

    /// The block's query and key projections of its input `x` (`ln1` first, biases
    /// included), for FastVID's salience.
    ///
    /// # Shapes
    /// - x: `[t * n, d]` -> `[t, n, d]` each
    pub(crate) fn probe(&self, x: Tensor<2>, t: usize, n: usize, cfg: &ClipVisionConfig) -> AttentionProbe {
        let y = self.ln1.forward(x);
        let d = y.dims()[1];
        let q = self.attn.q.forward(y.clone()).reshape([t, n, d]);
        let k = self.attn.k.forward(y).reshape([t, n, d]);
        AttentionProbe { q, k, heads: cfg.n_heads }
    }

    /// # Shapes
    /// - x: `[t * n, d]` (t images of n tokens) -> same
    pub(crate) fn forward(&self, x: Tensor<2>, t: usize, n: usize, cfg: &ClipVisionConfig) -> Tensor<2> {
        self.forward_rows(x, t, n, cfg, n)
    }

    /// [`EncoderLayer::forward`] with attention taking at most `rows` queries at a time.
    pub(crate) fn forward_rows(&self, x: Tensor<2>, t: usize, n: usize, cfg: &ClipVisionConfig, rows: usize) -> Tensor<2> {
        let scaled = |y: Tensor<2>, s: Option<&Tensor<1>>| match s {
            Some(s) => y * s.clone().unsqueeze::<2>(),
            None => y,
        };
        let ls = self.layer_scale.as_ref();
        let h = x.clone() + scaled(self.attn.forward_rows(self.ln1.forward(x), t, n, cfg.n_heads, rows), ls.map(|s| &s.0));
        let mlp = self.fc2.forward(cfg.act.forward(self.fc1.forward(self.ln2.forward(h.clone()))));
        h + scaled(mlp, ls.map(|s| &s.1))
    }
}
