//! Frames and `ask` as a user runs them: the native decoder against the ffmpeg CLI at the
//! sampled indices (mp4, gif, webm, mkv, avi), one clear line for every bad video, and a
//! streamed answer from the tiny Video-LLaVA fixture about a real clip.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value as Json;
use vidllm_tests::fixture;

fn clips() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("VIDLLM_CLIPS").unwrap_or_else(|_| format!("{}/.cache/vidllm/clips", std::env::var("HOME").unwrap_or_default())),
    );
    assert!(p.join("bigbuckbunny.mp4").exists(), "{} has no clips: run tests/scripts/fetch_clips.sh", p.display());
    p
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vidllm-video-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn ffmpeg(args: &[&str]) {
    let st = Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).status().expect("ffmpeg CLI");
    assert!(st.success(), "ffmpeg {args:?}");
}

/// A clip re-encoded into another container/codec (1.5 s of carphone).
fn converted(ext: &str, codec: &[&str]) -> String {
    let out = tmp(&format!("carphone.{ext}"));
    let src = clips().join("carphone_pristine.mp4");
    let mut args = vec!["-i", src.to_str().unwrap(), "-t", "1.5"];
    args.extend_from_slice(codec);
    args.push(out.to_str().unwrap());
    ffmpeg(&args);
    out.display().to_string()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vidllm-native")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn ask(video: &str, extra: &[&str]) -> (bool, String, String) {
    let model = fixture("tiny_video_llava");
    let mut args = vec![
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--video",
        video,
        "--prompt",
        "What happens?",
        "--quant",
        "f32",
        "--max-tokens",
        "6",
        "--json",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--device") {
        args.extend_from_slice(&["--device", "cpu"]);
    }
    run(&args)
}

/// The ffmpeg CLI's RGB frames at `indices` (decode order, no frame-rate conversion).
fn cli_frames(path: &str, indices: &[u64], w: usize, h: usize) -> Vec<Vec<u8>> {
    let select: Vec<String> = indices.iter().map(|i| format!("eq(n\\,{i})")).collect();
    let vf = format!("select='{}'", select.join("+"));
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i", path, "-vf", &vf, "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout.chunks(w * h * 3).map(<[u8]>::to_vec).collect()
}

/// Our frames (through `ask --json` for the indices, and the reader via `frames` dump).
fn check_against_cli(path: &str) {
    let (ok, out, err) =
        run(&["frames", "--video", path, "--frames", "8", "--sampling", "hf", "--dump", tmp("dump.rgb").to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(&out).unwrap();
    let (w, h) = (v["width"].as_u64().unwrap() as usize, v["height"].as_u64().unwrap() as usize);
    let indices: Vec<u64> = v["frames"].as_array().unwrap().iter().map(|f| f["index"].as_u64().unwrap()).collect();
    let ours = std::fs::read(tmp("dump.rgb")).unwrap();
    let theirs = cli_frames(path, &indices, w, h);
    assert_eq!(theirs.len(), indices.len(), "{path}: ffmpeg gave {} frames", theirs.len());
    for (k, reference) in theirs.iter().enumerate() {
        let mine = &ours[k * w * h * 3..(k + 1) * w * h * 3];
        let worst = mine.iter().zip(reference).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        println!("{path} frame {}: max channel difference {worst}/255", indices[k]);
        assert!(worst <= 2, "{path} frame {}: {worst}/255", indices[k]);
    }
}

#[test]
fn frames_equal_the_ffmpeg_cli() {
    check_against_cli(clips().join("bigbuckbunny.mp4").to_str().unwrap());
    check_against_cli(&converted("gif", &["-vf", "fps=10,scale=88:-1"]));
    check_against_cli(&converted("webm", &["-c:v", "libvpx-vp9", "-b:v", "200k"]));
    check_against_cli(&converted("mkv", &["-c:v", "libx264"]));
    check_against_cli(&converted("avi", &["-c:v", "mpeg4"]));
}

#[test]
fn ask_streams_an_answer_about_a_real_clip() {
    let clip = clips().join("bigbuckbunny.mp4");
    let (ok, out, err) = ask(clip.to_str().unwrap(), &[]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    let frames = v["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 8);
    assert_eq!(frames[1]["index"], 16); // np.arange(0, 132, 16.5).astype(int)
    assert!((frames[1]["pts"].as_f64().unwrap() - 0.64).abs() < 1e-6);
    assert_eq!(v["visual_tokens"], 40);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 6);
    // Streaming (no --json): the answer goes to stdout, the stage timings to stderr.
    let model = fixture("tiny_video_llava");
    let (ok, _, err) = run(&[
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--video",
        clip.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--device",
        "cpu",
        "--max-tokens",
        "4",
        "--sampling",
        "linspace",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("#131@") && err.contains("visual tokens: 40") && err.contains("encode"), "{err}");
}

#[test]
fn ask_on_gpu_device() {
    if std::env::var("VIDLLM_TEST_NO_GPU").is_ok_and(|v| v == "1") {
        return;
    }
    let clip = clips().join("carphone_pristine.mp4");
    let (ok, out, err) = ask(clip.to_str().unwrap(), &["--device", "gpu", "--sampling", "pllava"]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    assert!(v["device"].as_str().unwrap().starts_with("gpu"));
}

fn assert_one_line_error(res: (bool, String, String), needle: &str) {
    let (ok, _, err) = res;
    assert!(!ok, "succeeded");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty() && !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error:") && lines[0].to_lowercase().contains(needle), "{err}");
}

#[test]
fn bad_videos_give_one_line_errors() {
    assert_one_line_error(ask("/nonexistent.mp4", &[]), "cannot open");
    let empty = tmp("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    assert_one_line_error(ask(empty.to_str().unwrap(), &[]), "empty");
    let junk = tmp("junk.mp4");
    std::fs::write(&junk, (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>()).unwrap();
    assert_one_line_error(ask(junk.to_str().unwrap(), &[]), "not a readable video");
    let audio = tmp("tone.wav");
    ffmpeg(&["-f", "lavfi", "-i", "sine=frequency=440:duration=0.5", audio.to_str().unwrap()]);
    assert_one_line_error(ask(audio.to_str().unwrap(), &[]), "no video stream");
    let short = clips().join("carphone_pristine.mp4");
    assert_one_line_error(ask(short.to_str().unwrap(), &["--frames", "500"]), "fewer than the 500");
    let huge = tmp("huge.mkv");
    ffmpeg(&["-f", "lavfi", "-i", "color=c=red:s=8000x4400:d=0.04", "-frames:v", "1", "-c:v", "png", huge.to_str().unwrap()]);
    assert_one_line_error(ask(huge.to_str().unwrap(), &[]), "larger than");
}

#[test]
fn bad_model_folders_give_one_line_errors() {
    let clip = clips().join("carphone_pristine.mp4");
    let dir = tmp("unknown-arch");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    let res = run(&["ask", "--model", dir.to_str().unwrap(), "--video", clip.to_str().unwrap(), "--prompt", "x", "--device", "cpu"]);
    assert_one_line_error(res, "unsupported architecture");
}

#[test]
fn ask_runs_pllava_folders_with_pool_and_lora_alpha() {
    let clip = clips().join("bikes.mp4");
    let model = fixture("tiny_pllava");
    let (ok, out, err) = run(&[
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--video",
        clip.to_str().unwrap(),
        "--prompt",
        "Describe",
        "--frames",
        "16",
        "--sampling",
        "pllava",
        "--pool",
        "4,2,2",
        "--lora-alpha",
        "8",
        "--max-tokens",
        "5",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["visual_tokens"], 16);
    assert_eq!(v["frames"].as_array().unwrap().len(), 16);
    assert_eq!(v["frames"][0]["index"], 7); // seg = 249 / 16 -> int(7.78) + 0
}

#[test]
fn ask_runs_merv_folders_and_reports_the_encoder_weights() {
    let clip = clips().join("bikes.mp4");
    let model = fixture("tiny_merv");
    let ask = |extra: &[&str]| {
        let mut a = vec!["ask", "--model", model.to_str().unwrap(), "--prompt", "What is happening?", "--max-tokens", "4"];
        a.extend_from_slice(&["--device", "cpu", "--json"]);
        a.extend_from_slice(extra);
        run(&a)
    };
    let (ok, out, err) = ask(&["--video", clip.to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    // One decode of 32 frames, np.linspace(0, 249, 32); 16 x 8 x 8 fused tokens.
    assert_eq!(v["visual_tokens"], 1024);
    let frames = v["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 32);
    assert_eq!((frames[1]["index"].as_u64(), frames[31]["index"].as_u64()), (Some(8), Some(249)));
    let w = v["encoder_weights"].as_object().expect("encoder_weights");
    let names: Vec<&str> = w.keys().map(|k| k.as_str()).collect();
    for n in ["languagebind", "dinov2", "vivit", "siglip"] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    let sum: f64 = w.values().map(|x| x.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-5, "weights sum to {sum}");
    // The visual tokens come right after BOS.
    assert_eq!(v["prompt_tokens"][0], 1);
    assert_eq!(v["prompt_tokens"][1], v["prompt_tokens"][1024]);

    // One device an encoder (`--devices`, the list repeated): said in `encoder_devices`.
    let (ok, out, err) = ask(&["--video", clip.to_str().unwrap(), "--devices", "cpu,gpu"]);
    if err.contains("no GPU adapter") {
        println!("no GPU adapter here: --devices cpu,gpu not run");
    } else {
        assert!(ok, "{err}");
        let v: Json = serde_json::from_str(out.trim()).unwrap();
        let on = &v["encoder_devices"];
        assert!(on["languagebind"].as_str().unwrap().starts_with("cpu") && on["vivit"].as_str().unwrap().starts_with("cpu"), "{on}");
        assert!(on["dinov2"].as_str().unwrap().starts_with("gpu") && on["siglip"].as_str().unwrap().starts_with("gpu"), "{on}");
        assert_eq!(v["visual_tokens"], 1024);
        assert!(err.contains("encoders: languagebind on cpu"), "{err}");
    }
    // Named errors: an unknown device, an adapter that is not there, a one-tower model.
    let (ok, _, err) = ask(&["--video", clip.to_str().unwrap(), "--devices", "tpu"]);
    assert!(!ok && err.contains("unknown device \"tpu\""), "{err}");
    let (ok, _, err) = ask(&["--video", clip.to_str().unwrap(), "--devices", "gpu:99"]);
    assert!(!ok && err.contains("no adapter gpu:99"), "{err}");
    let one_tower = fixture("tiny_video_llava");
    let (ok, _, err) =
        run(&["ask", "--model", one_tower.to_str().unwrap(), "--video", clip.to_str().unwrap(), "--prompt", "What?", "--devices", "cpu"]);
    assert!(!ok && err.contains("one vision tower"), "{err}");

    // A still image is a clip of copies of it.
    let image = tmp("merv_still.png");
    ffmpeg(&["-y", "-i", clip.to_str().unwrap(), "-frames:v", "1", image.to_str().unwrap()]);
    let (ok, out, err) = ask(&["--image", image.to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["visual_tokens"], 1024);
    assert!(v["encoder_weights"].is_object());
}

#[test]
fn ask_runs_llava_next_video_folders() {
    let clip = clips().join("carphone_pristine.mp4");
    let model = fixture("tiny_llava_next_video");
    let (ok, out, err) = run(&[
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--video",
        clip.to_str().unwrap(),
        "--prompt",
        "Describe",
        "--frames",
        "4",
        "--max-tokens",
        "3",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["visual_tokens"], 16); // 4 frames x (4x4 patches pooled 2x2)
}

#[test]
fn follow_up_questions_reuse_the_encoded_video() {
    use std::io::Write;
    let clip = clips().join("carphone_pristine.mp4");
    let model = fixture("tiny_video_llava");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vidllm-native"))
        .args(["ask", "--model", model.to_str().unwrap(), "--video", clip.to_str().unwrap(), "--device", "cpu", "--max-tokens", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is this?\nAnd then?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let prefills: Vec<usize> =
        err.lines().filter_map(|l| l.split("[prefill ").nth(1)).map(|s| s.split(' ').next().unwrap().parse().unwrap()).collect();
    assert_eq!(prefills.len(), 2, "{err}");
    assert!(prefills[0] > 40, "first turn carries the 40 visual tokens: {prefills:?}");
    assert!(prefills[1] < 20, "the follow-up pays only for its own tokens: {prefills:?}");
}

/// SmolVLM2 as a user runs it: the clip decoded natively, sampled by the model's own
/// policy (1 frame a second, from the folder), preprocessed on the device, the prompt
/// stating each frame's time: the prompt ids and greedy tokens transformers gives for the
/// same clip (`gen_smolvlm_fixtures.py`), on every device.
#[test]
fn ask_runs_smolvlm_folders_as_transformers_does() {
    let clip = clips().join("carphone_pristine.mp4");
    let model = fixture("tiny_smolvlm");
    let r = vidllm_core::safetensors::Checkpoint::open_files(&[fixture("tiny_smolvlm_ref.safetensors")]).unwrap();
    let want = |name: &str| -> Json { r.i64(name).unwrap().0.into() };
    let mut devices = vec!["cpu"];
    if !std::env::var("VIDLLM_TEST_NO_GPU").is_ok_and(|v| v == "1") {
        devices.push("gpu");
    }
    for device in devices {
        let (ok, out, err) = run(&[
            "ask",
            "--model",
            model.to_str().unwrap(),
            "--video",
            clip.to_str().unwrap(),
            "--prompt",
            &r.metadata["question"],
            "--quant",
            "f32",
            "--max-tokens",
            "8",
            "--device",
            device,
            "--json",
        ]);
        assert!(ok, "{err}");
        let v: Json = serde_json::from_str(out.trim()).unwrap();
        let indices: Vec<i64> = v["frames"].as_array().unwrap().iter().map(|f| f["index"].as_i64().unwrap()).collect();
        assert_eq!(Json::from(indices), want("frame_indices"), "{device}");
        assert_eq!(v["prompt_tokens"], want("input_ids"), "{device}");
        assert_eq!(v["tokens"], want("greedy"), "{device}");
    }
    // --frames caps the model's policy: 2 frames, and the 4 s clip is now longer than
    // they need plus 2 s, so a second is skipped at each end (transformers: [29, 90]).
    let (ok, out, err) = run(&[
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--video",
        clip.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--frames",
        "2",
        "--max-tokens",
        "1",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Json = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["visual_tokens"], 18);
    let indices: Vec<i64> = v["frames"].as_array().unwrap().iter().map(|f| f["index"].as_i64().unwrap()).collect();
    assert_eq!(indices, [29, 90]);
}

/// A SmolVLM2 folder whose sizes do not fit together is refused in one line naming them.
#[test]
fn smolvlm_folders_with_sizes_that_do_not_fit_are_refused() {
    let clip = clips().join("carphone_pristine.mp4");
    let broken = |name: &str, file: &str, from: &str, to: &str| -> PathBuf {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixture("tiny_smolvlm")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains(from), "{file} has no {from}");
        std::fs::write(dir.join(file), text.replace(from, to)).unwrap();
        dir
    };
    let ask_in = |dir: PathBuf| {
        run(&["ask", "--model", dir.to_str().unwrap(), "--video", clip.to_str().unwrap(), "--prompt", "x", "--device", "cpu"])
    };
    let dir = broken("smolvlm-scale", "config.json", "\"scale_factor\": 4", "\"scale_factor\": 5");
    assert_one_line_error(ask_in(dir), "scale_factor 5 does not divide the 12 x 12 patch grid");
    let dir = broken("smolvlm-size", "video_preprocessor_config.json", "\"longest_edge\": 96", "\"longest_edge\": 512");
    assert_one_line_error(ask_in(dir), "max_image_size.longest_edge 512 is not the vision tower's image_size 96");
}

/// llama.cpp's pair for the same model (`convert_hf_to_gguf.py`, and with `--mmproj`):
/// `ask --model text.gguf --mmproj mmproj.gguf` gives the folder's prompt and tokens.
#[test]
fn ask_runs_llama_cpp_gguf_pairs_like_the_folder() {
    let clip = clips().join("carphone_pristine.mp4");
    let r = vidllm_core::safetensors::Checkpoint::open_files(&[fixture("tiny_smolvlm_ref.safetensors")]).unwrap();
    let want = |name: &str| -> Json { r.i64(name).unwrap().0.into() };
    for ty in ["F16", "Q8_0"] {
        let (text, mm) = (fixture(&format!("tiny_smolvlm.{ty}.gguf")), fixture(&format!("mmproj-tiny_smolvlm-{ty}.gguf")));
        let (ok, out, err) = run(&[
            "ask",
            "--model",
            text.to_str().unwrap(),
            "--mmproj",
            mm.to_str().unwrap(),
            "--video",
            clip.to_str().unwrap(),
            "--prompt",
            &r.metadata["question"],
            "--max-tokens",
            "8",
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(ok, "{err}");
        let v: Json = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["prompt_tokens"], want("input_ids"), "{ty}");
        assert_eq!(v["tokens"], want("greedy"), "{ty}");
    }
}

/// A pair that is not one model's, or a projector vidllm does not read: one line naming
/// the fields.
#[test]
fn bad_gguf_pairs_give_one_line_errors() {
    let clip = clips().join("carphone_pristine.mp4");
    let ask_pair = |text: &str, mm: &str, extra: &[&str]| {
        let mut args = vec!["ask", "--model", text, "--mmproj", mm, "--video", clip.to_str().unwrap(), "--prompt", "x", "--device", "cpu"];
        args.extend_from_slice(extra);
        run(&args)
    };
    let text = fixture("tiny_smolvlm.Q8_0.gguf");
    let mm = fixture("mmproj-tiny_smolvlm-Q8_0.gguf");
    let (text, mm) = (text.to_str().unwrap(), mm.to_str().unwrap());
    // Another projector type: the same file with its `clip.projector_type` string changed.
    let bytes = std::fs::read(mm).unwrap();
    let at = bytes.windows(8).position(|w| w == b"idefics3").unwrap();
    let mut other = bytes.clone();
    other[at..at + 8].copy_from_slice(b"ldp_v2xx");
    let other_path = tmp("mmproj-other.gguf");
    std::fs::write(&other_path, other).unwrap();
    assert_one_line_error(ask_pair(text, other_path.to_str().unwrap(), &[]), "clip.projector_type \"ldp_v2xx\" is not supported");
    // A decoder of another width (a tiny Qwen2, 256 wide).
    let qwen = fixture("tiny_qwen2.Q8_0.gguf");
    assert_one_line_error(
        ask_pair(qwen.to_str().unwrap(), mm, &[]),
        "64-wide embeddings (clip.vision.projection_dim) but the text gguf's decoder is 256",
    );
    // The files swapped.
    assert_one_line_error(ask_pair(mm, text, &[]), "general.architecture");
    assert_one_line_error(ask_pair(text, mm, &["--quant", "q8_0"]), "--quant and --vision-quant apply to a model folder");
    assert_one_line_error(ask_pair(text, mm, &["--vision-quant", "q8_0"]), "--quant and --vision-quant apply to a model folder");
    let (ok, _, err) = ask_pair(text, mm, &["--vision-quant", "q4_0"]);
    assert!(!ok && err.contains("unknown vision tower weights \"q4_0\" (f32, q8_0)"), "{err}");
}

/// `ask --image --json` (f32 decoder, 8 tokens, CPU) on the picture a reference file holds
/// (`image`, written as a PNG), asked `question`: the JSON answer, and the reference.
fn ask_about_reference_image(folder: &str, reference: &str, question: &str) -> (Json, vidllm_core::safetensors::Checkpoint) {
    let r = vidllm_core::safetensors::Checkpoint::open_files(&[fixture(reference)]).unwrap();
    let (rgb, shape) = r.raw("image").map(|(b, _, s)| (b.to_vec(), s)).unwrap();
    let raw = tmp(&format!("{folder}.rgb"));
    std::fs::write(&raw, rgb).unwrap();
    let png = tmp(&format!("{folder}.png"));
    let size = format!("{}x{}", shape[1], shape[0]);
    ffmpeg(&["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &size, "-i", raw.to_str().unwrap(), png.to_str().unwrap()]);
    let model = fixture(folder);
    let (ok, out, err) = run(&[
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--image",
        png.to_str().unwrap(),
        "--prompt",
        &r.metadata[question],
        "--quant",
        "f32",
        "--max-tokens",
        "8",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    (serde_json::from_str(out.trim()).unwrap(), r)
}

/// A still image to SmolVLM2 (`--image`, no video): cut into tiles as transformers' image
/// processor cuts it, the prompt's tile rows, and transformers' greedy tokens.
#[test]
fn ask_about_an_image_with_smolvlm_splits_it_like_transformers() {
    let (v, r) = ask_about_reference_image("tiny_smolvlm", "tiny_smolvlm_ref.safetensors", "image_question");
    let want = |name: &str| -> Json { r.i64(name).unwrap().0.into() };
    assert_eq!(v["visual_tokens"], 17 * 9); // 4 x 4 tiles and the global view, 9 tokens each
    assert_eq!(v["prompt_tokens"], want("image_input_ids"));
    assert_eq!(v["tokens"], want("image_greedy"));
}

/// Idefics3 (`gen_idefics3_fixtures.py`): a still image gives transformers' prompt and
/// greedy tokens; a video is refused in one line before any frame is decoded.
#[test]
fn ask_runs_idefics3_on_images_and_refuses_video() {
    let (v, r) = ask_about_reference_image("tiny_idefics3", "tiny_idefics3_ref.safetensors", "question");
    let want = |name: &str| -> Json { r.i64(name).unwrap().0.into() };
    assert_eq!(v["visual_tokens"], 17 * 16); // 4 x 4 tiles and the global view, 16 tokens each
    assert_eq!(v["prompt_tokens"], want("input_ids"));
    assert_eq!(v["tokens"], want("greedy"));

    let model = fixture("tiny_idefics3");
    let clip = clips().join("carphone_pristine.mp4");
    let refused = run(&["ask", "--model", model.to_str().unwrap(), "--video", clip.to_str().unwrap(), "--prompt", "x", "--device", "cpu"]);
    assert_one_line_error(refused, "idefics3 takes still images only, not a video");
}
