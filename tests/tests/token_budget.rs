//! Visual-token budgets against their PyTorch references
//! (`tests/fixtures/gen_token_budget_fixtures.py`): SlowFast-LLaVA's pathways built with
//! the pooling ops of its authors' code, MaxInfo's key frames with the authors' maxvol
//! library, FastVID's segments, salient tokens and merged density peaks as the authors'
//! code computes them. Same frames and tokens kept (FastVID: at the same positions), same
//! values within 1e-5 relative, on every device.

use burn::tensor::{Tensor, TensorData};
use vidllm_core::safetensors::Checkpoint;
use vidllm_models::merge::Visual;
use vidllm_models::token_budget::{Budget, FrameGrid, Reduce, reduce};
use vidllm_tests::{check_stage, fixture, test_devices};

#[derive(serde::Deserialize)]
struct Case {
    key: String,
    method: String,
    frames: usize,
    prefix: usize,
    rows: usize,
    cols: usize,
    per_frame: bool,
    budget: usize,
    asked: Option<usize>,
}

fn cases() -> Vec<Case> {
    let bytes = std::fs::read(fixture("token_budget_ref.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_str(header["__metadata__"]["cases"].as_str().unwrap()).unwrap()
}

#[test]
fn reductions_match_the_pytorch_references() {
    let ck = Checkpoint::open_files(&[fixture("token_budget_ref.safetensors")]).unwrap();
    let cases = cases();
    assert_eq!(cases.len(), 13);
    for (name, at) in test_devices() {
        for c in &cases {
            let (input, shape) = ck.f32(&format!("{}.in", c.key)).unwrap();
            let d = shape[1];
            let features = Tensor::<2>::from_data(TensorData::new(input.clone(), [shape[0], d]), &at.device);
            let grid = FrameGrid { frames: c.frames, prefix: c.prefix, rows: c.rows, cols: c.cols, placeholder_per_frame: c.per_frame };
            let per = grid.tokens_per_frame();
            let visual = Visual::new(7, features, if c.per_frame { per } else { grid.tokens() });
            let method: Reduce = c.method.parse().unwrap();
            let budget = Budget::new(c.budget, method, c.asked.unwrap_or(c.frames)).unwrap();
            let r = reduce(visual, grid, &budget).unwrap();
            let got = r.visual.features.into_data().try_into_vec::<f32>().unwrap();
            let (want, frames_want): (Vec<f32>, Vec<usize>) = match c.method.as_str() {
                "slowfast" => {
                    let frame_of: Vec<usize> = ck.i64(&format!("{}.frame_of", c.key)).unwrap().0.iter().map(|&f| f as usize).collect();
                    let mut frames = frame_of.clone();
                    frames.sort_unstable();
                    frames.dedup();
                    if c.per_frame {
                        let counts: Vec<usize> = frames.iter().map(|f| frame_of.iter().filter(|g| *g == f).count()).collect();
                        assert_eq!(r.visual.counts.as_ref(), Some(&counts), "{name} {}", c.key);
                    }
                    (ck.f32(&format!("{}.out", c.key)).unwrap().0, frames)
                }
                "fastvid" => {
                    let index: Vec<usize> = ck.i64(&format!("{}.index", c.key)).unwrap().0.iter().map(|&i| i as usize).collect();
                    let mut frames: Vec<usize> = index.iter().map(|i| i / per).collect();
                    frames.dedup();
                    // The survivors keep their places in the unreduced video.
                    let at = r.visual.kept_at.as_ref().expect("fastvid keeps positions");
                    if c.per_frame {
                        assert_eq!(at.spans, vec![per; frames.len()], "{name} {}", c.key);
                        assert_eq!(at.offsets, index.iter().map(|i| i % per).collect::<Vec<_>>(), "{name} {}", c.key);
                        let counts: Vec<usize> = frames.iter().map(|f| index.iter().filter(|i| *i / per == *f).count()).collect();
                        assert_eq!(r.visual.counts.as_ref(), Some(&counts), "{name} {}", c.key);
                    } else {
                        assert_eq!((&at.spans, &at.offsets), (&vec![grid.tokens()], &index), "{name} {}", c.key);
                    }
                    (ck.f32(&format!("{}.out", c.key)).unwrap().0, frames)
                }
                _ => {
                    let kept: Vec<usize> = ck.i64(&format!("{}.kept", c.key)).unwrap().0.iter().map(|&f| f as usize).collect();
                    (kept.iter().flat_map(|&f| input[f * per * d..(f + 1) * per * d].to_vec()).collect(), kept)
                }
            };
            assert_eq!(r.frames, frames_want, "{name} {}: frames kept", c.key);
            assert_eq!(got.len(), want.len(), "{name} {}: tokens {} vs {}", c.key, got.len() / d, want.len() / d);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!(
                "{name} {}: {} -> {} tokens, frames {:?}, max |diff| {diff:.2e} (scale {scale:.2})",
                c.key, r.report.tokens_before, r.report.tokens_after, r.frames
            );
            assert!(diff <= 1e-5 * scale, "{name} {}: max |diff| {diff} over 1e-5 x {scale}", c.key);
            assert_eq!(r.report.tokens_after, want.len() / d);
        }
    }
}

#[test]
fn bad_budgets_are_refused_clearly() {
    let device = burn::tensor::Device::flex();
    let grid = FrameGrid { frames: 8, prefix: 1, rows: 4, cols: 4, placeholder_per_frame: false };
    let visual = || Visual::new(7, Tensor::<2>::zeros([grid.tokens(), 8], &device), grid.tokens());
    assert!(Budget::new(0, Reduce::SlowFast, 8).unwrap_err().contains("budget of 0"));
    let unknown = "maxvol".parse::<Reduce>().unwrap_err();
    assert!(unknown.contains("unknown reduction") && unknown.contains("slowfast"), "{unknown}");
    assert!(unknown.contains("framefusion"), "{unknown}");
    // FrameFusion marks the video for the decoder and keeps every token.
    let r = reduce(visual(), grid, &Budget::new(40, Reduce::FrameFusion, 8).unwrap()).unwrap();
    assert_eq!((r.report.tokens_after, r.visual.features.dims()[0]), (136, 136));
    let plan = r.visual.fusion.expect("a plan for the decoder");
    assert_eq!((plan.budget, plan.tokens, plan.tokens_per_frame), (40, 136, 17));
    assert!(r.report.note.as_deref().unwrap().contains("merges and prunes them in its layers"));
    // FastVID keeps at least a token a frame.
    let err = reduce(visual(), grid, &Budget::new(7, Reduce::FastVid, 8).unwrap()).err().unwrap().to_string();
    assert!(err.contains("at least one token a frame"), "{err}");
    // Over the budget with none: refused, naming both counts.
    let err = reduce(visual(), grid, &Budget::new(100, Reduce::None, 8).unwrap()).err().unwrap().to_string();
    assert!(err.contains("136 visual tokens") && err.contains("max_visual_tokens 100"), "{err}");
    // A budget the video already fits: a no-op, said in the report.
    let r = reduce(visual(), grid, &Budget::new(500, Reduce::SlowFast, 8).unwrap()).unwrap();
    assert_eq!(r.report.tokens_after, 136);
    assert!(r.report.note.as_deref().unwrap().contains("already fit"));
    // Too small for the method: the smallest that works is named.
    let err = reduce(visual(), grid, &Budget::new(10, Reduce::SlowFast, 8).unwrap()).err().unwrap().to_string();
    assert!(err.contains("at least 17"), "{err}");
    let err = reduce(visual(), grid, &Budget::new(16, Reduce::MaxInfo, 8).unwrap()).err().unwrap().to_string();
    assert!(err.contains("whole frames of 17 tokens"), "{err}");
}

/// Every architecture answers from a reduced video, on every device: the prompt holds the
/// reduced tokens (SmolVLM2: one placeholder run per frame kept, with its own count).
#[test]
fn every_architecture_answers_under_a_budget() {
    use std::rc::Rc;
    use vidllm_core::sampler::SamplerConfig;
    use vidllm_core::sampling::FrameTimes;
    use vidllm_models::llama_hf::QuantChoice;
    use vidllm_models::model_files::ModelFiles;
    use vidllm_models::video_model::LoadOptions;
    use vidllm_models::{Conversation, GenerateParams, Model, Prompt};

    for (name, at) in test_devices() {
        for arch in ["tiny_video_llava", "tiny_pllava", "tiny_llava_next_video", "tiny_smolvlm", "tiny_merv"] {
            let opts = LoadOptions { quant: QuantChoice::F32, ..Default::default() };
            let folder = ModelFiles::Dir(fixture(arch)).load(opts, &at).unwrap();
            let model = Rc::new(Model::Video(folder.model));
            let tok = Rc::new(folder.tok);
            let vm = model.video().unwrap();
            let (t, s) = (8, vm.image_size());
            let pixels: Vec<f32> =
                (0..t * 3 * s * s).map(|i| (((i * 7919) % 1000) as f32 / 500.0 - 1.0) * ((i / (s * s)) % 5) as f32).collect();
            let times = FrameTimes { times: (0..t).map(|i| i as f64 * 0.5).collect(), duration: t as f64 * 0.5 };
            let full = vm.video_grid(t).tokens();
            for method in [Reduce::SlowFast, Reduce::MaxInfo, Reduce::FastVid, Reduce::FrameFusion] {
                let px = Tensor::<4>::from_data(TensorData::new(pixels.clone(), [t, 3, s, s]), &at.device);
                let budget = Budget::new(full * 2 / 3, method, t / 2).unwrap();
                let e = vm.encode_video(px, Some(&budget)).unwrap();
                let mut r = e.reduction.clone().unwrap();
                // FrameFusion reduces in the decoder: every token goes in.
                let fused = method == Reduce::FrameFusion;
                assert!(fused || (r.tokens_after <= full * 2 / 3 && r.tokens_after > 0), "{name} {arch} {method:?}: {r:?}");
                let mut conv = Conversation::new(model.clone(), tok.clone(), 2048);
                conv.set_video(e.visual.clone(), e.times(&times));
                assert_eq!(conv.visual_tokens(), r.tokens_after);
                let params = GenerateParams { max_tokens: 3, sampler: SamplerConfig::default(), stop: Vec::new() };
                conv.ask(Prompt::Question("What happens?"), params).unwrap();
                let f = conv.answer(|_| true).unwrap();
                let prompt = &conv.history()[..conv.history().len() - f.tokens.len()];
                let placeholders = prompt.iter().filter(|&&id| id == e.visual.token).count();
                assert_eq!(placeholders, r.tokens_after, "{name} {arch} {method:?}");
                if fused {
                    // Each layer attended to no more tokens than the one before it (the
                    // cost model's average is checked against the reference in framefusion.rs).
                    let fusion = f.fusion.as_ref().expect("FrameFusion ran in the prefill");
                    assert_eq!(fusion.layer_tokens.len(), model.decoder().blocks.len(), "{name} {arch}");
                    assert!(fusion.layer_tokens.windows(2).all(|w| w[0] >= w[1]) && fusion.layer_tokens[0] <= full, "{fusion:?}");
                    println!("{name} {arch} framefusion: tokens by layer {:?}, merged {:?}", fusion.layer_tokens, fusion.merged);
                    r.after_prefill(fusion);
                } else {
                    assert!(f.fusion.is_none());
                }
                println!(
                    "{name} {arch} {}: {} -> {} tokens, frames {} -> {}, prompt {} ids ({placeholders} visual), answer {:?}",
                    r.method,
                    r.tokens_before,
                    r.tokens_after,
                    r.frames_before,
                    r.frames_after,
                    prompt.len(),
                    f.text
                );
                // FastVID's kept tokens keep their places: the positions after the prompt
                // are those of the unreduced video's prompt (every frame kept here).
                // FrameFusion's prompt goes in whole, so nothing is skipped in the history.
                let skipped = conv.next_position() - (conv.history().len() - 1);
                if method == Reduce::FastVid {
                    assert_eq!((r.frames_after, skipped), (r.frames_before, r.tokens_before - r.tokens_after), "{name} {arch}");
                } else {
                    assert_eq!(skipped, 0, "{name} {arch} {method:?}");
                }
            }
        }
    }
}

/// FastVID's salience from each architecture's vision tower against the Qwen2.5-VL code's
/// formula on transformers' own blocks (`tests/fixtures/gen_fastvid_salience_fixtures.py`:
/// forward hooks on the feature block's `q_proj` / `k_proj`, pooled as each connector pools;
/// MERV's four towers as `gen_merv_fixtures.py` writes them, mixed by the fusion's weights),
/// then the tokens FastVID keeps with it against the reference's, on every device; the
/// same from a live window's frames, each encoded alone as it arrived.
#[test]
fn fastvid_salience_comes_from_the_tower() {
    use vidllm_models::live_window::LiveWindow;
    use vidllm_models::llama_hf::QuantChoice;
    use vidllm_models::model_files::ModelFiles;
    use vidllm_models::video_model::LoadOptions;

    #[derive(serde::Deserialize)]
    struct SalienceCase {
        name: String,
        frames: usize,
        per: usize,
        budget: Option<usize>,
    }
    let path = fixture("fastvid_salience_ref.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let cases: Vec<SalienceCase> = serde_json::from_str(header["__metadata__"]["cases"].as_str().unwrap()).unwrap();
    assert_eq!(cases.len(), 5);
    let ck = Checkpoint::open_files(&[path]).unwrap();
    for (device, at) in test_devices() {
        for c in &cases {
            let opts = LoadOptions { quant: QuantChoice::F32, ..Default::default() };
            let vm = ModelFiles::Dir(fixture(&format!("tiny_{}", c.name))).load(opts, &at).unwrap().model;
            let (px, shape) = ck.f32(&format!("{}.pixels", c.name)).unwrap();
            let pixels = || Tensor::<4>::from_data(TensorData::new(px.clone(), [shape[0], shape[1], shape[2], shape[3]]), &at.device);
            let want = ck.f32(&format!("{}.salience", c.name)).unwrap().0;
            let visual = vm.video_probed(pixels());
            let got = visual.salience.expect("the tower's salience").into_data().try_into_vec::<f32>().unwrap();
            assert_eq!(got.len(), c.frames * c.per, "{device} {}", c.name);
            // A stage of f32 parity, as every other (MERV's from the decoded frames through
            // vidllm's resizes, which are within one 8-bit level of PIL's).
            check_stage(&format!("{} salience of {} tokens", c.name, got.len()), &device, &got, &want);
            // Each frame's salience is a distribution over its tokens.
            for f in got.chunks_exact(c.per) {
                assert!((f.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{device} {}", c.name);
            }
            // A live window's frames, encoded one by one as they arrive, give the same
            // salience (MERV encodes its window's frames together, as above).
            if c.name != "merv" {
                let frame = |i: usize| pixels().narrow(0, i, 1);
                let shares = (0..shape[0]).map(|i| vm.frame_share(frame(i)).expect("frames encoded alone")).collect();
                let visual = vm.video_from_shares(shares).unwrap();
                let got = visual.salience.expect("the shares' salience").into_data().try_into_vec::<f32>().unwrap();
                check_stage(&format!("{} salience from frame shares", c.name), &device, &got, &want);
            }
            let Some(budget) = c.budget else { continue };
            let kept: Vec<usize> = ck.i64(&format!("{}.kept", c.name)).unwrap().0.iter().map(|&i| i as usize).collect();
            let e = vm.encode_video(pixels(), Some(&Budget::new(budget, Reduce::FastVid, shape[0]).unwrap())).unwrap();
            let at = e.visual.kept_at.as_ref().expect("fastvid keeps positions");
            let frames = e.frames.clone().unwrap_or_else(|| (0..c.frames).collect());
            // Kept video token indices: per-frame runs (SmolVLM2) hold offsets within their frame.
            let got: Vec<usize> = if at.spans.len() == 1 {
                at.offsets.clone()
            } else {
                let counts = e.visual.counts.clone().unwrap();
                let mut i = 0;
                frames
                    .iter()
                    .zip(&counts)
                    .flat_map(|(&f, &k)| (0..k).map(move |j| (f, j)))
                    .map(|(f, _)| {
                        let o = at.offsets[i];
                        i += 1;
                        f * c.per + o
                    })
                    .collect()
            };
            println!("{device} {}: FastVID kept {:?}", c.name, got);
            assert_eq!(got, kept, "{device} {}: the tokens FastVID keeps", c.name);
            // The same from a live window fed frame by frame.
            let mut window = LiveWindow::new(shape[0]).unwrap();
            for i in 0..shape[0] {
                window.push(&vm, pixels().narrow(0, i, 1), i as u64, i as f64);
            }
            let live = window.video(&vm, Some(&Budget::new(budget, Reduce::FastVid, shape[0]).unwrap())).unwrap();
            assert_eq!(live.encoded_now, 0, "{device} {}", c.name);
            let (a, b) = (live.encoded.visual.kept_at.as_ref().unwrap(), e.visual.kept_at.as_ref().unwrap());
            assert_eq!((&a.spans, &a.offsets), (&b.spans, &b.offsets), "{device} {}: a live window's FastVID", c.name);
        }
    }
}
