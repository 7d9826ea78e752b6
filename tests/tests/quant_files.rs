//! SmolLM2-135M-Instruct requantised by llama.cpp's own quantizer into the types people
//! download (Q2_K ... Q6_K mixes, IQ4_XS, Q5_0, Q8_0, BF16; `tests/fixtures/gen_quant_fixtures.py`),
//! each against llama.cpp's own run of that file: the per-tensor type mix as gguf-py reads
//! it, teacher-forced argmax wherever llama.cpp's decision is clear, greedy continuation,
//! and the weights kept in the file's blocks on every device. One test per file.
//!
//! Every file runs on the CPU. A software GPU (lavapipe in CI) is slow at whole-model runs,
//! so there the files run whose mixes together hold every block type llama.cpp wrote
//! (`ON_SOFTWARE_GPU`), with the chat turn (prefill and greedy decoding);
//! `VIDLLM_TEST_GPU_ALL=1` runs every file and case on every device.

use std::rc::Rc;

use serde::Deserialize;
use vidllm_core::gguf::Gguf;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::{Model, load_llama};
use vidllm_tests::llamacpp::{Case, QuantFile, greedy_matches, teacher_forcing};
use vidllm_tests::{every_case_on, fixture, smollm2_quant_path, test_devices};

/// Q2_K: Q3_K, Q4_0, Q8_0. Q4_K_M: Q4_K, Q5_0, Q6_K. Q5_K_M: Q5_1, Q5_K. IQ4_XS: IQ4_NL,
/// IQ4_XS. BF16. (Q3_K_M, Q5_0, Q6_K and Q8_0 hold no type these do not.)
const ON_SOFTWARE_GPU: [&str; 5] = ["Q2_K", "Q4_K_M", "Q5_K_M", "IQ4_XS", "BF16"];

#[derive(Deserialize)]
struct Fixture {
    files: Vec<QuantFile>,
}

fn parity(name: &str) {
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_quants_llamacpp.json")).unwrap()).unwrap();
    let f = fixture.files.into_iter().find(|f| f.name == name).expect("file in the fixture");
    let g = Gguf::open(smollm2_quant_path(&f.file)).unwrap();
    let mix = f.check_file(&g);

    let tok = Rc::new(Tokenizer::from_gguf(&g).unwrap());
    for (device, at) in test_devices() {
        let all = every_case_on(&device);
        if !all && !ON_SOFTWARE_GPU.contains(&name) {
            println!("{device} {name}: its block types run on this device in the files of ON_SOFTWARE_GPU");
            continue;
        }
        let cases: Vec<&Case> = f.cases.iter().filter(|c| all || c.name == "chat_question").collect();
        let model = Rc::new(Model::Text(load_llama(&g, &at).unwrap()));
        let resident = model.decoder().weights_device_bytes() as f64 / g.file_len() as f64;
        assert!(resident <= 1.05, "{device} {name}: weights on device {resident:.3}x the file");
        let (seen, _) = teacher_forcing(model.decoder(), cases.iter().copied(), &device);
        let greedy = greedy_matches(&model, &tok, cases.iter().copied(), &device);
        let positions: usize = seen.iter().map(|a| a.positions).sum();
        let compared: usize = seen.iter().map(|a| a.compared).sum();
        let worst = seen.iter().map(|a| a.worst).fold(0f32, f32::max);
        println!("| {name} | {mix} | {device} | {positions} | {compared}/{compared} | {greedy} | {worst:.3} | {resident:.3} |");
    }
}

macro_rules! files {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            parity($name);
        }
    )*};
}

files! {
    q2_k => "Q2_K",
    q3_k_m => "Q3_K_M",
    q4_k_m => "Q4_K_M",
    q5_k_m => "Q5_K_M",
    q6_k => "Q6_K",
    iq4_xs => "IQ4_XS",
    q5_0 => "Q5_0",
    q8_0 => "Q8_0",
    bf16 => "BF16",
}
