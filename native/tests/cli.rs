//! The `vidllm-native` command line as users and outside tools call it: good runs on the
//! real SmolLM2 file, and one clear line (no panic) for every kind of bad input.

use std::process::Command;

use serde_json::Value as Json;
use vidllm_core::gguf::Value;
use vidllm_core::gguf::writer::{TensorSpec, write};
use vidllm_tests::smollm2_path;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vidllm-native"))
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().expect("runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A bad input must fail with one `error:` line naming the problem.
fn assert_clean_failure(args: &[&str], needle: &str) {
    let (ok, _, err) = run(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("error:") && lines[0].to_lowercase().contains(needle), "{args:?}: {err}");
}

fn temp_file(name: &str, bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("vidllm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn tiny_gguf(meta: &[(&str, Value)], ty_id: u32, dims: Vec<u64>) -> Vec<u8> {
    let data = vec![0u8; 64];
    write(meta, &[TensorSpec { name: "token_embd.weight", dims, ty_id, data: &data }])
}

fn model() -> String {
    smollm2_path().display().to_string()
}

#[test]
fn bad_files_give_one_line_errors() {
    let real = std::fs::read(smollm2_path()).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.gguf", real[..real.len() / 2].to_vec(), "beyond the end"),
        ("header-only.gguf", real[..100].to_vec(), "truncated"),
        ("magic.gguf", b"GGML\x03\0\0\0".to_vec(), "not a gguf"),
        (
            "version.gguf",
            {
                let mut b = real[..64].to_vec();
                b[4] = 7;
                b
            },
            "version 7",
        ),
        ("empty.gguf", Vec::new(), "truncated"),
        ("type.gguf", tiny_gguf(&[], 77, vec![16]), "unknown"),
        // A type ggml has and vidllm does not read is named, with its tensor.
        ("iq2.gguf", tiny_gguf(&[], 17, vec![256]), "token_embd.weight is of ggml type iq2_xs"),
        // K-quant rows are whole 256-element super-blocks; a truncated super-block is out of the file.
        ("k-row.gguf", tiny_gguf(&[], 12, vec![576, 1]), "row length 576 is not a multiple of the q4_k block"),
        ("k-short.gguf", tiny_gguf(&[], 12, vec![512]), "beyond the end"),
        ("dims.gguf", tiny_gguf(&[], 0, vec![1 << 31, 1 << 31, 1 << 31]), "dimension"),
        ("keys.gguf", tiny_gguf(&[("general.architecture", Value::String("llama".into()))], 0, vec![16]), "missing"),
        ("arch.gguf", tiny_gguf(&[("general.architecture", Value::String("mamba".into()))], 0, vec![16]), "architecture"),
    ];
    for (name, bytes, needle) in cases {
        let p = temp_file(name, &bytes);
        assert_clean_failure(&["chat", "--model", &p, "--prompt", "hi", "--device", "cpu"], needle);
    }
    // A tensor whose data lies beyond the file.
    let mut b = tiny_gguf(&[], 0, vec![16]);
    b.truncate(b.len() - 32);
    let p = temp_file("offset.gguf", &b);
    assert_clean_failure(&["chat", "--model", &p, "--prompt", "hi", "--device", "cpu"], "beyond the end");
    assert_clean_failure(&["chat", "--model", "/nonexistent.gguf", "--prompt", "hi"], "cannot open");
}

#[test]
fn prompt_longer_than_context_is_refused() {
    let long = "word ".repeat(200);
    assert_clean_failure(&["chat", "--model", &model(), "--prompt", &long, "--ctx", "64", "--device", "cpu"], "context");
    assert_clean_failure(&["logits", "--model", &model(), "--prompt", &long, "--ctx", "64", "--device", "cpu", "--json"], "context");
}

#[test]
fn tokenize_json() {
    let (ok, out, err) = run(&["tokenize", "--model", &model(), "--text", "Hello world", "--json"]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tokens"], serde_json::json!([19556, 905]));
}

#[test]
fn chat_json_on_cpu() {
    let (ok, out, err) = run(&["chat", "--model", &model(), "--prompt", "What is 2+2?", "--max-tokens", "8", "--device", "cpu", "--json"]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    assert!(v["tokens"].as_array().unwrap().len() <= 8 && !v["text"].as_str().unwrap().is_empty());
    let resident = v["weights_device_bytes"].as_u64().unwrap();
    let file = std::fs::metadata(smollm2_path()).unwrap().len();
    assert!(resident as f64 <= 1.1 * file as f64, "{resident} vs {file}");
    assert!(err.contains("decode"), "timings on stderr: {err}");
}

#[test]
fn logits_json_shape() {
    let (ok, out, err) = run(&["logits", "--model", &model(), "--prompt-tokens", "19556,905", "--top", "3", "--device", "cpu", "--json"]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(v["positions"].as_array().unwrap().len(), 2);
    assert_eq!(v["positions"][0]["top"].as_array().unwrap().len(), 3);
}

fn fixture(name: &str) -> String {
    vidllm_tests::fixture(name).display().to_string()
}

#[test]
fn chat_on_qwen_files_and_folders() {
    // GGUF files from llama.cpp's converter and quantizer, and the transformers folders they
    // were made from (quantised on load). Parity is in tests/tests/qwen_parity.rs.
    for (model, quant) in
        [("tiny_qwen2.Q4_K_M.gguf", None), ("tiny_qwen3.Q8_0.gguf", None), ("tiny_qwen2", Some("q8_0")), ("tiny_qwen3", None)]
    {
        let path = fixture(model);
        let mut args = vec!["chat", "--model", &path, "--prompt", "What is the tallest mountain?", "--max-tokens", "4"];
        args.extend(["--device", "cpu", "--json"]);
        if let Some(q) = quant {
            args.extend(["--quant", q]);
        }
        let (ok, out, err) = run(&args);
        assert!(ok, "{model}: {err}");
        let v: Json = serde_json::from_str(out.trim()).unwrap();
        assert!(!v["tokens"].as_array().unwrap().is_empty(), "{model}: {out}");
    }
    let gguf = fixture("tiny_qwen2.Q8_0.gguf");
    assert_clean_failure(&["chat", "--model", &gguf, "--quant", "q8_0", "--prompt", "hi", "--device", "cpu"], "--quant applies");
    // A text model has no vision tower: --vision-quant is refused, for a GGUF and a folder.
    assert_clean_failure(
        &["chat", "--model", &gguf, "--vision-quant", "q8_0", "--prompt", "hi", "--device", "cpu"],
        "--vision-quant applies",
    );
    let folder = fixture("tiny_qwen2");
    assert_clean_failure(
        &["chat", "--model", &folder, "--vision-quant", "q8_0", "--prompt", "hi", "--device", "cpu"],
        "--vision-quant applies",
    );
    let video = fixture("tiny_video_llava");
    assert_clean_failure(&["chat", "--model", &video, "--prompt", "hi", "--device", "cpu"], "not name a text model");
}

/// `--activations int8` runs a GGUF file and a folder on the CPU; an unknown precision is
/// refused by name, and on a GPU (whose kernels take f32 activations) the flag is an error.
#[test]
fn activations_flag() {
    for model in ["tiny_qwen2.Q8_0.gguf", "tiny_qwen3"] {
        let path = fixture(model);
        let (ok, out, err) =
            run(&["chat", "--model", &path, "--prompt", "hi", "--max-tokens", "3", "--device", "cpu", "--activations", "int8", "--json"]);
        assert!(ok, "{model}: {err}");
        let v: Json = serde_json::from_str(out.trim()).unwrap();
        assert!(!v["tokens"].as_array().unwrap().is_empty(), "{model}: {out}");
    }
    let gguf = fixture("tiny_qwen2.Q8_0.gguf");
    let (ok, _, err) = run(&["chat", "--model", &gguf, "--prompt", "hi", "--device", "cpu", "--activations", "int4"]);
    assert!(!ok && err.contains("unknown activation precision \"int4\" (int16, int8)") && !err.contains("panicked"), "{err}");
    if !std::env::var("VIDLLM_TEST_NO_GPU").is_ok_and(|v| v == "1") {
        assert_clean_failure(
            &["chat", "--model", &gguf, "--prompt", "hi", "--device", "gpu", "--activations", "int8"],
            "--activations applies to the cpu backend",
        );
    }
}

#[test]
fn qwen2_file_without_a_bias_names_the_tensor() {
    // Qwen2 always has q/k/v biases: a file without one is broken, not a LLaMA.
    let mut bytes = std::fs::read(vidllm_tests::fixture("tiny_qwen2.Q8_0.gguf")).unwrap();
    let name = b"blk.1.attn_k.bias";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("the tensor is in the file");
    bytes[at + name.len() - 4..at + name.len()].copy_from_slice(b"xxxx");
    let p = temp_file("qwen2-no-bias.gguf", &bytes);
    assert_clean_failure(&["chat", "--model", &p, "--prompt", "hi", "--device", "cpu"], "blk.1.attn_k.bias");
}
