//! Rows at RoPE positions with gaps (a reduced video whose survivors keep their places,
//! as FastVID's do) against transformers given the same `position_ids`
//! (`tests/fixtures/gen_kept_positions_fixtures.py`, the tiny Qwen2 folder in f32): the
//! prompt's logits at every row, then three greedy tokens run one at a time from the
//! cache, each at the position after the last. On every device.

use vidllm_core::safetensors::Checkpoint;
use vidllm_models::generate::read_row;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::model_files::ModelFiles;
use vidllm_models::{KvCache, Logits};
use vidllm_tests::{check_stage, fixture, test_devices};

#[test]
fn gapped_positions_match_transformers() {
    let path = fixture("kept_positions_ref.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = &header["__metadata__"];
    let seq: Vec<u32> = serde_json::from_str(meta["sequence"].as_str().unwrap()).unwrap();
    let pos: Vec<usize> = serde_json::from_str(meta["positions"].as_str().unwrap()).unwrap();
    let prompt: usize = meta["prompt"].as_str().unwrap().parse().unwrap();
    let (want, shape) = Checkpoint::open_files(&[path]).unwrap().f32("logits").unwrap();
    let vocab = shape[1];
    for (device, at) in test_devices() {
        let (model, _) = ModelFiles::Dir(fixture("tiny_qwen2")).load_text(QuantChoice::F32, &at, None).unwrap();
        let mut cache = KvCache::new(&model.cfg, seq.len() + 1, &model.device);
        let x = model.embed.lookup(&seq[..prompt], &model.device);
        let got = read_row(model.forward_embeds_at(x, Some(&pos[..prompt]), &mut cache, Logits::All)).unwrap();
        check_stage("prompt logits at gapped positions", &device, &got, &want[..prompt * vocab]);
        assert_eq!((cache.len, cache.next_position()), (prompt, pos[prompt - 1] + 1), "{device}");
        for (i, &t) in seq[prompt..].iter().enumerate() {
            let got = read_row(model.forward(&[t], &mut cache, Logits::Last)).unwrap();
            let row = prompt + i;
            check_stage(&format!("decode step {i} at position {}", pos[row]), &device, &got, &want[row * vocab..(row + 1) * vocab]);
        }
        // Forgetting the gapped rows forgets their gaps.
        cache.truncate(2);
        assert_eq!(cache.next_position(), 2);
        cache.truncate(0);
        assert_eq!(cache.next_position(), 0);
    }
}
