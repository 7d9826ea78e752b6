//! llama.cpp's model pairs: a text GGUF (the decoder and its tokenizer) and an `mmproj`
//! GGUF (the vision tower and the connector), as `convert_hf_to_gguf.py` and
//! `convert_hf_to_gguf.py --mmproj` write them and as llama.cpp's `tools/mtmd` reads them.
//!
//! The mmproj's tensors are renamed to the Hugging Face names the tower and connector
//! loaders read (`v.blk.0.attn_q.weight` -> `...encoder.layers.0.self_attn.q_proj.weight`)
//! and dequantised to f32, so a pair and a folder go through one loader. A file whose
//! tower blocks' matrices are Q8_0 then has them quantised back to Q8_0 at load
//! ([`TowerWeights::Q8_0`]), which gives the file's own blocks again: ggml's Q8_0 scale is
//! `amax / 127` and the largest code 127, so a dequantised block maps back to its scale
//! and codes exactly. `clip.projector_type` picks the architecture;
//! its `clip.vision.*` hyper-parameters stand in for `config.json` and the preprocessor
//! config.

use vidllm_core::LoadError;
use vidllm_core::ggml::{GgmlType, dequantize};
use vidllm_core::gguf::{Gguf, TensorInfo};
use vidllm_core::preprocess::PreprocessorJson;
use vidllm_core::safetensors::{Checkpoint, writer};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_shaders::device::Placement;

use crate::clip::ClipVisionConfigJson;
use crate::layers::TowerWeights;
use crate::model_files::Folder;
use crate::smolvlm::SmolVlm;
use crate::video_model::{Preprocessing, VideoModel};
use crate::{Llama, load_llama};

/// `clip.projector_type`s vidllm reads, and the `model_type` each one is.
pub const PROJECTORS: [(&str, &str); 1] = [("idefics3", "smolvlm")];

/// The vision side of a pair: hyper-parameters and the tensors under Hugging Face names.
pub struct Mmproj {
    pub projector: String,
    pub vision: ClipVisionConfigJson,
    /// `clip.vision.projector.scale_factor`
    pub scale_factor: usize,
    /// `clip.vision.projection_dim`: the width the connector writes (the decoder's).
    pub projection_dim: usize,
    /// The preprocessor config the file's keys amount to.
    pub preprocessor: PreprocessorJson,
    /// How the tower's linear layers are stored: Q8_0 where the file's are all Q8_0.
    pub tower: TowerWeights,
    pub ck: Checkpoint,
}

/// Where llama.cpp's vision names (`v.`, `mm.`) go among Hugging Face's, under `vision` and
/// `connector` prefixes; `None` for a tensor this projector does not use.
fn hf_name(name: &str, vision: &str, connector: &str) -> Option<String> {
    let fixed = match name {
        "v.patch_embd.weight" => Some("embeddings.patch_embedding.weight"),
        "v.patch_embd.bias" => Some("embeddings.patch_embedding.bias"),
        "v.position_embd.weight" => Some("embeddings.position_embedding.weight"),
        "v.post_ln.weight" => Some("post_layernorm.weight"),
        "v.post_ln.bias" => Some("post_layernorm.bias"),
        "mm.model.fc.weight" => return Some(format!("{connector}modality_projection.proj.weight")),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(format!("{vision}{f}"));
    }
    let rest = name.strip_prefix("v.blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "ln1" => "layer_norm1",
        "ln2" => "layer_norm2",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_out" => "self_attn.out_proj",
        "ffn_up" => "mlp.fc1",
        "ffn_down" => "mlp.fc2",
        _ => return None,
    };
    Some(format!("{vision}encoder.layers.{layer}.{hf}.{kind}"))
}

impl Mmproj {
    /// Read an mmproj file; unsupported projector types are refused by name.
    pub fn read(g: &Gguf) -> Result<Self, LoadError> {
        let what = |k: &str| format!("mmproj: {k}");
        if g.get("general.architecture").and_then(|v| v.as_str()) != Some("clip") {
            return Err(LoadError::Unsupported(format!(
                "{}: {:?} (an mmproj file says \"clip\": is this the text GGUF?)",
                what("general.architecture"),
                g.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("missing")
            )));
        }
        let projector = g.str("clip.projector_type").map_err(|e| LoadError::Unsupported(format!("mmproj: {e}")))?.to_string();
        if !PROJECTORS.iter().any(|(p, _)| *p == projector) {
            let known: Vec<&str> = PROJECTORS.iter().map(|(p, _)| *p).collect();
            return Err(LoadError::Unsupported(format!(
                "{} {projector:?} is not supported (supported: {})",
                what("clip.projector_type"),
                known.join(", ")
            )));
        }
        let u = |k: &str| g.u64(k).map(|v| v as usize).map_err(|e| LoadError::Unsupported(format!("mmproj: {e}")));
        let image_size = u("clip.vision.image_size")?;
        let vision = ClipVisionConfigJson {
            hidden_size: Some(u("clip.vision.embedding_length")?),
            intermediate_size: Some(u("clip.vision.feed_forward_length")?),
            num_hidden_layers: Some(u("clip.vision.block_count")?),
            num_attention_heads: Some(u("clip.vision.attention.head_count")?),
            image_size: Some(image_size),
            patch_size: Some(u("clip.vision.patch_size")?),
            // `clip.use_gelu`: GELU in its tanh form, as ggml computes it and SigLIP trains it.
            hidden_act: Some("gelu_pytorch_tanh".into()),
            layer_norm_eps: g.get("clip.vision.attention.layer_norm_epsilon").and_then(|v| v.as_f64()),
            num_channels: Some(3),
        };
        let floats = |k: &str| -> Option<[f32; 3]> {
            let a = g.get(k)?.as_array()?;
            let v: Vec<f32> = a.iter().filter_map(|x| x.as_f64()).map(|x| x as f32).collect();
            v.try_into().ok()
        };
        let longest = g.get("clip.vision.preproc_image_size").and_then(|v| v.as_u64()).map(|v| v as usize);
        let preprocessor = PreprocessorJson {
            size: longest.map(|n| serde_json::json!({ "longest_edge": n })),
            max_image_size: Some(serde_json::json!({ "longest_edge": image_size })),
            image_mean: floats("clip.vision.image_mean"),
            image_std: floats("clip.vision.image_std"),
            ..Default::default()
        };
        let block_matrices: Vec<&TensorInfo> =
            g.tensors.iter().filter(|t| t.name.starts_with("v.blk.") && t.name.ends_with(".weight") && t.shape().len() == 2).collect();
        let tower = match !block_matrices.is_empty() && block_matrices.iter().all(|t| t.ty == GgmlType::Q8_0) {
            true => TowerWeights::Q8_0,
            false => TowerWeights::F32,
        };
        let mut entries = Vec::new();
        for t in &g.tensors {
            let Some(name) = hf_name(&t.name, "model.vision_model.", "model.connector.") else { continue };
            entries.push(writer::Entry::f32(&name, t.shape(), &to_f32(g, t)?));
        }
        let ck = Checkpoint::from_buffers(vec![("mmproj".into(), writer::write(&entries))])?;
        Ok(Self {
            projector,
            vision,
            scale_factor: u("clip.vision.projector.scale_factor")?,
            projection_dim: u("clip.vision.projection_dim")?,
            preprocessor,
            tower,
            ck,
        })
    }
}

fn to_f32(g: &Gguf, t: &TensorInfo) -> Result<Vec<f32>, LoadError> {
    let n = t.n_elements() as usize;
    let bytes = g.tensor_bytes(t);
    if t.ty.bytes_for(n as u64) != Some(bytes.len() as u64) {
        return Err(LoadError::Unsupported(format!(
            "mmproj: tensor {} ({}) has {} bytes for {n} values",
            t.name,
            t.ty.name(),
            bytes.len()
        )));
    }
    Ok(dequantize(t.ty, bytes, n))
}

/// A text GGUF and its mmproj as one video-language model, with the text file's tokenizer:
/// what `ModelFiles::load` gives for a folder.
pub fn load_pair(text: &Gguf, mmproj: &Gguf, at: &Placement) -> Result<Folder, LoadError> {
    let mm = Mmproj::read(mmproj)?;
    let tok = Tokenizer::from_gguf(text)?;
    let decoder: Llama = load_llama(text, at)?;
    if mm.projection_dim != decoder.cfg.d_model {
        return Err(LoadError::Unsupported(format!(
            "the mmproj writes {}-wide embeddings (clip.vision.projection_dim) but the text GGUF's decoder is {} wide \
             ({}.embedding_length): they are not one model's pair",
            mm.projection_dim,
            decoder.cfg.d_model,
            text.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("llama")
        )));
    }
    let (model_type, model) = match mm.projector.as_str() {
        "idefics3" => ("smolvlm", SmolVlm::from_mmproj(&mm, decoder, &tok, at)?),
        other => unreachable!("{other} passed the PROJECTORS check"),
    };
    let model = VideoModel::new(model_type, Box::new(model), &mm.preprocessor, &mm.preprocessor)?;
    // The tower's block matrices too (the decoder's were settled as it loaded).
    vidllm_shaders::settle_weights();
    let Preprocessing { pixels, sampling, .. } = model.preprocessing().clone();
    Ok(Folder { model, tok, pre: pixels, sampling })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_names_map_to_hugging_face() {
        let v = "model.vision_model.";
        let c = "model.connector.";
        assert_eq!(hf_name("v.blk.11.attn_out.bias", v, c).unwrap(), "model.vision_model.encoder.layers.11.self_attn.out_proj.bias");
        assert_eq!(hf_name("v.blk.0.ffn_up.weight", v, c).unwrap(), "model.vision_model.encoder.layers.0.mlp.fc1.weight");
        assert_eq!(hf_name("v.post_ln.weight", v, c).unwrap(), "model.vision_model.post_layernorm.weight");
        assert_eq!(hf_name("mm.model.fc.weight", v, c).unwrap(), "model.connector.modality_projection.proj.weight");
        assert_eq!(hf_name("v.blk.0.something.weight", v, c), None);
    }
}
