//! A real checkpoint folder must load as transformers wrote it, whichever version: the
//! tiny Video-LLaVA fixture re-keyed to the 4.52-5.5 and >=5.6 layouts, split into shards
//! with an index, and stored in bf16, gives the same outputs; a missing or misshaped
//! weight is a clear error.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::safetensors::writer::{Entry, write};
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::video_llava::VideoLlava;
use vidllm_models::video_model::LoadOptions;
use vidllm_tests::fixture;

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vidllm-layout-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"] {
        std::fs::copy(fixture("tiny_video_llava").join(f), d.join(f)).unwrap();
    }
    d
}

/// The fixture's tensors, renamed (None drops one), as f32 or bf16 entries.
fn entries(rename: &dyn Fn(&str) -> Option<String>, bf16: bool) -> Vec<Entry> {
    let ck = Checkpoint::open_dir(&fixture("tiny_video_llava")).unwrap();
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    names
        .iter()
        .filter_map(|n| {
            let new = rename(n)?;
            let (v, shape) = ck.f32(n).unwrap();
            Some(if bf16 { Entry::bf16(&new, shape, &v) } else { Entry::f32(&new, shape, &v) })
        })
        .collect()
}

fn features(dir: &Path) -> Result<Vec<f32>, String> {
    let at = vidllm_tests::cpu();
    let device = at.device.clone();
    let model = VideoLlava::load(dir, QuantChoice::F32, &at).map_err(|e| e.to_string())?;
    let s = model.video_tower.cfg.image_size;
    let px: Vec<f32> = (0..2 * 3 * s * s).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let pixels = Tensor::<4>::from_data(TensorData::new(px, [2, 3, s, s]), &device);
    let f = model.video_features(pixels);
    let mut cache = vidllm_models::KvCache::new(&model.decoder.cfg, 8, &device);
    let l = model.decoder.forward(&[1, 5, 9], &mut cache, vidllm_models::Logits::Last);
    let mut out = f.into_data().try_into_vec::<f32>().unwrap();
    out.extend(l.into_data().try_into_vec::<f32>().unwrap());
    Ok(out)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    d / b.iter().map(|v| v.abs()).fold(1e-12, f32::max)
}

fn save(dir: &Path, name: &str, e: &[Entry]) {
    std::fs::write(dir.join(name), write(e)).unwrap();
}

#[test]
fn all_transformers_layouts_load_the_same() {
    let want = features(&fixture("tiny_video_llava")).unwrap();
    // 4.52-5.5 in-memory names.
    let mid = |n: &str| {
        Some(if let Some(r) = n.strip_prefix("language_model.model.") {
            format!("model.language_model.{r}")
        } else if n == "language_model.lm_head.weight" {
            "lm_head.weight".into()
        } else {
            format!("model.{n}")
        })
    };
    // >=5.6: towers without `vision_model.`.
    let new = |n: &str| Some(n.replace("_tower.vision_model.", "_tower."));
    for (tag, f) in [("mid", &mid as &dyn Fn(&str) -> Option<String>), ("new", &new)] {
        let d = tmp_dir(tag);
        save(&d, "model.safetensors", &entries(f, false));
        let got = features(&d).unwrap();
        println!("{tag} layout: max relative difference {:.1e}", max_rel(&got, &want));
        assert!(max_rel(&got, &want) < 1e-6, "{tag}");
    }
}

#[test]
fn sharded_checkpoints_with_an_index_load() {
    let want = features(&fixture("tiny_video_llava")).unwrap();
    let d = tmp_dir("sharded");
    let all = entries(&|n| Some(n.to_string()), false);
    let (a, b): (Vec<Entry>, Vec<Entry>) = all.into_iter().partition(|e| e.name.starts_with("language_model"));
    save(&d, "model-00001-of-00002.safetensors", &a);
    save(&d, "model-00002-of-00002.safetensors", &b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|e| (e.name.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(b.iter().map(|e| (e.name.clone(), "model-00002-of-00002.safetensors".into())))
        .collect();
    std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    assert!(max_rel(&features(&d).unwrap(), &want) < 1e-6);
}

#[test]
fn bf16_checkpoints_load_as_f32() {
    let want = features(&fixture("tiny_video_llava")).unwrap();
    let d = tmp_dir("bf16");
    save(&d, "model.safetensors", &entries(&|n| Some(n.to_string()), true));
    let e = max_rel(&features(&d).unwrap(), &want);
    println!("bf16 weights: max relative difference {e:.1e}");
    assert!(e < 0.05, "bf16 rounding only: {e}");
}

#[test]
fn missing_and_misshaped_weights_are_named() {
    let d = tmp_dir("missing");
    let gone = "language_model.model.layers.1.mlp.up_proj.weight";
    save(&d, "model.safetensors", &entries(&|n| (n != gone).then(|| n.to_string()), false));
    let e = features(&d).unwrap_err();
    assert!(e.contains(gone), "{e}");

    let d = tmp_dir("misshaped");
    let mut es = entries(&|n| Some(n.to_string()), false);
    let victim = es.iter_mut().find(|e| e.name == "multi_modal_projector.linear_1.weight").unwrap();
    let n = victim.data.len() / 4;
    victim.shape = vec![n / 16, 16];
    save(&d, "model.safetensors", &es);
    let e = features(&d).unwrap_err();
    assert!(e.contains("multi_modal_projector.linear_1.weight") && e.contains("shape"), "{e}");
}

#[test]
fn a_folder_read_into_memory_loads_the_same() {
    // What a browser does: fetch the files, then build everything from bytes.
    let dir = fixture("tiny_video_llava");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let ck = Checkpoint::from_buffers(vec![("model.safetensors".into(), bytes)]).unwrap();
    let cfg: vidllm_models::video_llava::VideoLlavaConfigJson = serde_json::from_str(&read("config.json")).unwrap();
    let at = vidllm_tests::cpu();
    let device = at.device.clone();
    let from_memory = VideoLlava::from_checkpoint(&ck, &cfg, &LoadOptions { quant: QuantChoice::F32, ..Default::default() }, &at).unwrap();
    let from_dir = VideoLlava::load(&dir, QuantChoice::F32, &at).unwrap();
    let ids = [1u32, 5, 9, 11];
    let logits = |m: &VideoLlava| {
        let mut cache = vidllm_models::KvCache::new(&m.decoder.cfg, 8, &device);
        m.decoder.forward(&ids, &mut cache, vidllm_models::Logits::Last).into_data().try_into_vec::<f32>().unwrap()
    };
    assert_eq!(logits(&from_memory), logits(&from_dir));
    let tok_mem = vidllm_core::tokenizer::Tokenizer::from_hf_json(&read("tokenizer.json"), Some(&read("tokenizer_config.json"))).unwrap();
    let tok_dir = vidllm_core::tokenizer::Tokenizer::from_hf_dir(&dir).unwrap();
    let text = "USER: <video>\nWhat is happening? ASSISTANT:";
    assert_eq!(tok_mem.encode(text, true).unwrap(), tok_dir.encode(text, true).unwrap());
}
