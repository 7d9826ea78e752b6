//! SmolVLM2 (Marafioti et al. 2025, "SmolVLM: Redefining small and efficient multimodal
//! models"); reference: transformers `models/smolvlm/` (`modeling_smolvlm.py`,
//! `processing_smolvlm.py`, `video_processing_smolvlm.py`), `model_type` `smolvlm`.
//!
//! Each frame is one square picture for the SigLIP tower (`siglip.rs`, Idefics3's bucketed
//! positions), pixel-shuffled and projected by the connector (`smolvlm_connector.rs`) into
//! `image_seq_len` tokens (64 for the 256M / 500M models). A video is not split into
//! tiles: every frame is resized to the tower's side. A still image is cut into tiles of
//! that side plus the whole picture as one more (`tile_image`), each tile's tokens after
//! its `<row_i_col_j>` marker. The prompt states the video's length and, before each
//! frame's tokens, the time it was taken:
//!
//! ```text
//! <|im_start|>User: You are provided the following series of four frames from a 0:00:04 [H:MM:SS] video.
//!
//! Frame from 00:00:<fake_token_around_image><global-img><image>...<fake_token_around_image>
//! Frame from 00:01:...
//!
//! What happens?<end_of_utterance>
//! Assistant:
//! ```

use burn::tensor::Tensor;
use serde::Deserialize;
use serde_json::json;
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson, Resample, Resize, TiledSizes};
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampling::{FrameTimes, Sampling};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_core::{GenerateError, LoadError};
use vidllm_shaders::device::Placement;

use crate::clip::{ClipVisionConfig, ClipVisionConfigJson};
use crate::fastvid::tower_salience;
use crate::llama::{Llama, LlamaConfig};
use crate::llama_hf::{LlamaConfigJson, LlamaNames, Plain, load_llama_hf};
use crate::llava::find_prefix;
use crate::merge::Visual;
use crate::mmproj::Mmproj;
use crate::siglip::{Positions, SiglipDefaults, SiglipVisionTower};
use crate::smolvlm_connector::{SmolVlmConnector, block_mean};
use crate::token_budget::FrameGrid;
use crate::video_model::{Architecture, FrameShare, FramesAlone, LoadOptions, Preprocessing, Tiling, parse_config};
use vidllm_shaders::preprocess::{normalise_planes, resize_planes};

/// `SmolVLMConfig` as in `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SmolVlmConfigJson {
    pub vision_config: ClipVisionConfigJson,
    pub text_config: LlamaConfigJson,
    pub scale_factor: Option<usize>,
    pub image_token_id: Option<u32>,
}

/// The chat template transformers' `SmolVLMProcessor.apply_chat_template` uses for any
/// conversation with a video when the caller passes none (`DEFAULT_CHAT_TEMPLATE` in
/// `processing_smolvlm.py`): the folder's own template is not consulted for videos.
pub const VIDEO_CHAT_TEMPLATE: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/// What ends a turn in the template (Idefics3's processor's `end_of_utterance_token`).
pub const END_OF_UTTERANCE: &str = "<end_of_utterance>";

/// Key prefixes: transformers <= 4.x (`model.vision_model.`), and the bare module names.
mod names {
    pub const VISION: [&str; 2] = ["model.vision_model.", "vision_model."];
    pub const CONNECTOR: [&str; 2] = ["model.connector.", "connector."];
    pub const TEXT: [&str; 2] = ["model.text_model.", "text_model."];
    pub const LM_HEAD: &str = "lm_head.weight";
}

pub struct SmolVlm {
    pub vision: SiglipVisionTower,
    pub connector: SmolVlmConnector,
    pub decoder: Llama,
    /// `<image>`: each stands for one of a frame's `image_seq_len` tokens.
    pub image_token: u32,
}

impl SmolVlm {
    /// Build from a checkpoint already open (from files or from memory) and its config.
    pub fn from_checkpoint(ck: &Checkpoint, cfg: &SmolVlmConfigJson, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        let text = LlamaConfig::try_from(&cfg.text_config)?;
        let model = find_prefix(ck, &names::TEXT, "embed_tokens.weight")?;
        let decoder = load_llama_hf(ck, &LlamaNames { model, lm_head: Some(names::LM_HEAD.into()) }, text, opts.quant, &Plain, at)?;
        let scale = cfg.scale_factor.unwrap_or(2);
        let vcfg = ClipVisionConfig { weights: opts.tower, ..cfg.vision_config.resolve(&SiglipDefaults::SMOLVLM)? };
        Self::assemble(ck, vcfg, scale, decoder, cfg.image_token_id.unwrap_or(128_257), "config.json: ", at)
    }

    /// Build from llama.cpp's pair: the mmproj's vision side, the text GGUF's decoder, whose
    /// tokenizer names the `<image>` token. The tower's matrices are stored as the mmproj
    /// stores them (`Mmproj::tower`): a Q8_0 file runs its blocks, as llama.cpp does.
    pub fn from_mmproj(mm: &Mmproj, decoder: Llama, tok: &Tokenizer, at: &Placement) -> Result<Self, LoadError> {
        let image_token =
            tok.id_of("<image>").ok_or_else(|| LoadError::Tokenizer("the text GGUF's vocabulary has no <image> token".into()))?;
        let vcfg = ClipVisionConfig { weights: mm.tower, ..mm.vision.resolve(&SiglipDefaults::SMOLVLM)? };
        Self::assemble(&mm.ck, vcfg, mm.scale_factor, decoder, image_token, "mmproj: clip.vision.projector.", at)
    }

    /// The tower and connector from `ck` (Hugging Face names), around `decoder`. `field`
    /// prefixes the name of the scale factor in errors.
    fn assemble(
        ck: &Checkpoint,
        vcfg: ClipVisionConfig,
        scale: usize,
        decoder: Llama,
        image_token: u32,
        field: &str,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        let grid = vcfg.grid();
        if scale == 0 || !grid.is_multiple_of(scale) {
            return Err(LoadError::Unsupported(format!(
                "{field}scale_factor {scale} does not divide the {grid} x {grid} patch grid (vision image_size {} / patch_size {})",
                vcfg.image_size, vcfg.patch_size
            )));
        }
        let vision =
            SiglipVisionTower::load(ck, &find_prefix(ck, &names::VISION, "post_layernorm.weight")?, vcfg, Positions::Bucketed, at)?;
        let connector_prefix = find_prefix(ck, &names::CONNECTOR, "modality_projection.proj.weight")?;
        let connector = SmolVlmConnector::load(ck, &connector_prefix, scale, vision.cfg.d_model, decoder.cfg.d_model, &at.device)?;
        Ok(Self { vision, connector, decoder, image_token })
    }

    /// `image_seq_len`: tokens per frame (or tile).
    pub fn image_seq_len(&self) -> usize {
        self.connector.tokens(self.vision.tokens())
    }

    /// The connector's tokens of each frame, frame-major.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t * image_seq_len, d_text]`
    pub fn image_features(&self, pixels: Tensor<4>) -> Tensor<2> {
        let y = self.connector.forward(self.vision.forward(pixels));
        let [t, n, d] = y.dims();
        y.reshape([t * n, d])
    }
}

impl FramesAlone for SmolVlm {
    /// Each frame is encoded on its own: its share is its connector's tokens. The probe's
    /// keys are averaged over each block of `r x r` patches that the pixel shuffle folds
    /// into one token, as the authors' Qwen2.5-VL code averages them over its merger's
    /// 2 x 2 blocks.
    fn share(&self, pixels: Tensor<4>) -> FrameShare {
        let (h, probe) = self.vision.forward_probed(pixels);
        let [t, n, _] = h.dims();
        let y = self.connector.forward(h);
        let d = y.dims()[2];
        let probe = probe.map(|p| p.pooled(|x| block_mean(x, self.connector.scale)));
        FrameShare::with_salience(y.reshape([t * self.connector.tokens(n), d]), probe.map(tower_salience))
    }

    fn video_of(&self, share: FrameShare) -> Visual {
        let visual = Visual::new(self.image_token, share.tokens, self.image_seq_len());
        Visual { salience: share.salience, ..visual }
    }
}

impl Architecture for SmolVlm {
    fn load(config_json: &str, ck: &Checkpoint, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        Self::from_checkpoint(ck, &parse_config(config_json)?, opts, at)
    }

    fn decoder(&self) -> &Llama {
        &self.decoder
    }

    fn image_size(&self) -> usize {
        self.vision.cfg.image_size
    }

    fn default_frames(&self) -> usize {
        64
    }

    /// The video processor's: frames resized so the longer side is the video size, then
    /// to the tower's square (transformers uses bicubic where the file says LANCZOS, as
    /// its video processor warns); SmolVLM2's sampling at the file's rate and count. The
    /// image processor's: PIL resizes (LANCZOS), tiles of the tower's side plus a global view.
    fn read_preprocessor(&self, video: &PreprocessorJson, image: &PreprocessorJson) -> Result<Preprocessing, LoadError> {
        for json in [video, image] {
            let side = PreprocessorJson::longest_edge(&json.max_image_size).unwrap_or(364);
            if side != self.image_size() {
                return Err(LoadError::Unsupported(format!(
                    "preprocessor config: max_image_size.longest_edge {side} is not the vision tower's image_size {} \
                     (frames and tiles are resized to the tower's side)",
                    self.image_size()
                )));
            }
            if json.do_resize == Some(false) {
                return Err(LoadError::Unsupported("preprocessor config: do_resize false (pictures must fit the tower)".into()));
            }
        }
        let side = self.image_size();
        let normalised = |json: &PreprocessorJson, resize: Resize, resample: Resample| {
            let mut c = PreprocessConfig { resize, crop: None, resample, rescale: 1.0 / 255.0, mean: [0.5; 3], std: [0.5; 3] };
            json.normalisation(&mut c);
            c
        };
        let sampling = video.video_sampling.as_ref();
        // `size` wins over `video_sampling.video_size` (the video processor's __init__).
        let longest = PreprocessorJson::longest_edge(&video.size)
            .or_else(|| sampling.and_then(|s| s["video_size"]["longest_edge"].as_u64()).map(|n| n as usize))
            .unwrap_or(4 * 364);
        let pixels = normalised(video, Resize::LongestEdgeThenSquare { longest, square: side }, Resample::Bicubic);
        // `video_sampling` wins over the top-level fields; the hub's folders give 1 fps, 64 frames.
        let fps = sampling.and_then(|s| s["fps"].as_f64()).or(video.fps).unwrap_or(1.0);
        let max_frames = sampling.and_then(|s| s["max_frames"].as_u64()).map(|n| n as usize).or(video.num_frames).unwrap_or(64);
        let resample = image.resample.map(Resample::from_pil).transpose()?.unwrap_or(Resample::Lanczos);
        let tiles = Tiling {
            longest: PreprocessorJson::longest_edge(&image.size).unwrap_or(4 * 364),
            tile: side,
            split: image.do_image_splitting.unwrap_or(true),
        };
        Ok(Preprocessing {
            pixels,
            sampling: Sampling::SmolVlm { fps, max_frames },
            images: normalised(image, Resize::None, resample),
            tiles: Some(tiles),
        })
    }

    fn video(&self, pixels: Tensor<4>) -> Visual {
        Visual::new(self.image_token, self.image_features(pixels), self.image_seq_len())
    }

    fn frames_alone(&self) -> Option<&dyn FramesAlone> {
        Some(self)
    }

    /// Each frame's pixel-shuffled grid, one timestamped placeholder a frame.
    fn video_grid(&self, frames: usize) -> FrameGrid {
        let side = self.image_seq_len().isqrt();
        FrameGrid { frames, prefix: 0, rows: side, cols: side, placeholder_per_frame: true }
    }

    fn supports_images(&self) -> bool {
        true
    }

    /// One image: cut into tiles plus a global view as the image processor does (PIL
    /// resizes on the device), each encoded as a frame is.
    fn images(&self, planes: Vec<Tensor<4>>, prep: &Preprocessing) -> Result<Visual, LoadError> {
        let [planes] = <[Tensor<4>; 1]>::try_from(planes)
            .map_err(|p| LoadError::Unsupported(format!("SmolVLM2 takes images one at a time ({} given)", p.len())))?;
        let tiling = prep.tiles.ok_or_else(|| LoadError::Unsupported("no tiling for SmolVLM2 images".into()))?;
        let (pictures, tiles) = tile_image(planes, &tiling, prep.images.resample);
        let features = self.image_features(normalise_planes(pictures, &prep.images));
        Ok(Visual { tiles, ..Visual::new(self.image_token, features, self.image_seq_len()) })
    }

    fn first_turn(&self, tok: &Tokenizer, question: &str, images: &[Visual], video: Option<&FrameTimes>) -> Result<String, GenerateError> {
        let (bos, eos) = (tok.token_text(tok.bos), tok.token_text(tok.eos));
        match (video, images.len()) {
            (Some(_), n) if n > 0 => Err(GenerateError::Unsupported("SmolVLM2 takes a video or images in one turn, not both".into())),
            (Some(times), _) => {
                let messages = json!([{ "role": "user", "content": [{ "type": "video" }, { "type": "text", "text": question }] }]);
                let text = vidllm_core::chat::render(VIDEO_CHAT_TEMPLATE, &messages, &bos, &eos)?;
                Ok(text.replacen("<video>", &video_prompt(times), 1))
            }
            (None, _) => {
                // Images: the folder's own template (transformers' default where it has none),
                // each `<image>` then replaced by its tiles' text, in order.
                let mut content: Vec<serde_json::Value> = images.iter().map(|_| json!({ "type": "image" })).collect();
                content.push(json!({ "type": "text", "text": question }));
                let messages = json!([{ "role": "user", "content": content }]);
                let template = tok.chat_template.as_deref().unwrap_or(VIDEO_CHAT_TEMPLATE);
                let text = vidllm_core::chat::render(template, &messages, &bos, &eos)?;
                let mut parts = text.split("<image>");
                let mut out = parts.next().unwrap_or_default().to_string();
                for (i, rest) in parts.enumerate() {
                    let tiles = images
                        .get(i)
                        .ok_or_else(|| GenerateError::Template("the chat template wrote more <image>s than images".into()))?
                        .tiles;
                    out.push_str(&image_prompt(tiles));
                    out.push_str(rest);
                }
                Ok(out)
            }
        }
    }

    /// The template's next turn after an answer: `<end_of_utterance>\nUser: {q}<end_of_utterance>\nAssistant:`
    /// (the processor's `end_of_utterance_token`, whatever the tokenizer's EOS is).
    fn follow_up(&self, _tok: &Tokenizer, question: &str) -> String {
        format!("{END_OF_UTTERANCE}\nUser: {question}{END_OF_UTTERANCE}\nAssistant:")
    }
}

/// The pictures the image processor makes of one image (`SmolVLMImageProcessor`): the
/// longest-edge resize, then either the resize to whole tiles and the tiles, row-major,
/// followed by the whole picture resized to one tile, or (not split) one tile. Each resize
/// is PIL's, 8-bit rounded, as the processor round-trips through PIL images.
///
/// # Shapes
/// - planes: `[1, 3, h, w]` (0..=255) -> `[rows * cols + 1, 3, tile, tile]` (or `[1, ..]`), 0..=255
pub fn tile_image(planes: Tensor<4>, t: &Tiling, filter: Resample) -> (Tensor<4>, Option<(usize, usize)>) {
    let [_, _, h, w] = planes.dims();
    let sizes = TiledSizes::new(h, w, t.longest, t.tile, t.split);
    let x = resize_planes(planes, sizes.resized, filter);
    if !t.split {
        return (resize_planes(x, (t.tile, t.tile), filter), None);
    }
    let x = resize_planes(x, sizes.tiled, filter);
    if sizes.rows == 0 {
        return (x, None);
    }
    let mut pictures = Vec::with_capacity(sizes.rows * sizes.cols + 1);
    for r in 0..sizes.rows {
        for c in 0..sizes.cols {
            pictures.push(x.clone().narrow(2, r * t.tile, t.tile).narrow(3, c * t.tile, t.tile));
        }
    }
    pictures.push(resize_planes(x, (t.tile, t.tile), filter));
    (Tensor::cat(pictures, 0), Some((sizes.rows, sizes.cols)))
}

/// What an image becomes in the prompt (`get_image_prompt_string`): per tile its
/// position and one `<image>` placeholder, a line per row, then the global view; one
/// placeholder stands for `image_seq_len` tokens.
pub fn image_prompt(tiles: Option<(usize, usize)>) -> String {
    const GLOBAL: &str = "<fake_token_around_image><global-img><image><fake_token_around_image>";
    let Some((rows, cols)) = tiles else { return GLOBAL.into() };
    let mut s = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            s.push_str(&format!("<fake_token_around_image><row_{r}_col_{c}><image>"));
        }
        s.push('\n');
    }
    s.push('\n');
    s.push_str(GLOBAL);
    s
}

/// What a video becomes in SmolVLM2's prompt (`expand_text_with_video_tokens`): the intro,
/// then per frame its time and one `<image>` placeholder between the image markers (each
/// placeholder later stands for the frame's `image_seq_len` tokens), then a blank line.
pub fn video_prompt(t: &FrameTimes) -> String {
    let mut s = format!(
        "You are provided the following series of {} frames from a {} [H:MM:SS] video.\n",
        number_words(t.times.len() as u64),
        clock(t.duration as u64)
    );
    for &at in &t.times {
        let (m, sec) = ((at / 60.0).floor() as u64, (at % 60.0) as u64);
        s.push_str(&format!("\nFrame from {m:02}:{sec:02}:<fake_token_around_image><global-img><image><fake_token_around_image>"));
    }
    s.push_str("\n\n");
    s
}

/// Python's `str(timedelta(seconds=s))`: `H:MM:SS`, with `N day(s), ` in front past a day.
pub fn clock(s: u64) -> String {
    let (days, rest) = (s / 86_400, s % 86_400);
    let hms = format!("{}:{:02}:{:02}", rest / 3600, rest / 60 % 60, rest % 60);
    match days {
        0 => hms,
        1 => format!("1 day, {hms}"),
        d => format!("{d} days, {hms}"),
    }
}

/// English cardinal words as `num2words` writes them: "four", "twenty-one",
/// "one hundred and one", "one thousand, two hundred and thirty-four".
pub fn number_words(n: u64) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];
    fn below_hundred(n: u64) -> String {
        match n {
            0..20 => ONES[n as usize].into(),
            _ if n.is_multiple_of(10) => TENS[(n / 10) as usize].into(),
            _ => format!("{}-{}", TENS[(n / 10) as usize], ONES[(n % 10) as usize]),
        }
    }
    fn below_thousand(n: u64) -> String {
        match (n / 100, n % 100) {
            (0, r) => below_hundred(r),
            (h, 0) => format!("{} hundred", ONES[h as usize]),
            (h, r) => format!("{} hundred and {}", ONES[h as usize], below_hundred(r)),
        }
    }
    if n < 1000 {
        return below_thousand(n);
    }
    // Groups of three digits, largest first; a last group under a hundred joins with "and".
    let scales = ["", " thousand", " million", " billion", " trillion", " quadrillion", " quintillion"];
    let mut groups = Vec::new();
    let mut m = n;
    while m > 0 {
        groups.push(m % 1000);
        m /= 1000;
    }
    let mut parts: Vec<String> = Vec::new();
    for (i, &g) in groups.iter().enumerate().rev() {
        if g == 0 {
            continue;
        }
        let words = format!("{}{}", below_thousand(g), scales[i]);
        if i == 0 && g < 100 {
            let last = parts.pop().unwrap_or_default();
            parts.push(format!("{last} and {words}"));
        } else {
            parts.push(words);
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_clock_match_python() {
        // num2words 0.5.14 and datetime.timedelta.
        let cases = [
            (1, "one"),
            (4, "four"),
            (13, "thirteen"),
            (20, "twenty"),
            (21, "twenty-one"),
            (64, "sixty-four"),
            (99, "ninety-nine"),
            (100, "one hundred"),
            (101, "one hundred and one"),
            (115, "one hundred and fifteen"),
            (200, "two hundred"),
            (999, "nine hundred and ninety-nine"),
            (1000, "one thousand"),
            (1001, "one thousand and one"),
            (1234, "one thousand, two hundred and thirty-four"),
            (21000, "twenty-one thousand"),
        ];
        for (n, w) in cases {
            assert_eq!(number_words(n), w);
        }
        let clocks = [(0, "0:00:00"), (4, "0:00:04"), (59, "0:00:59"), (61, "0:01:01"), (3600, "1:00:00"), (3725, "1:02:05")];
        for (s, c) in clocks {
            assert_eq!(clock(s), c);
        }
        assert_eq!(clock(86_400), "1 day, 0:00:00");
        assert_eq!(clock(90_061), "1 day, 1:01:01");
    }

    #[test]
    fn video_prompt_reads_like_the_processor() {
        let t = FrameTimes::of_indices(&[0, 39, 79, 119], 120, 30000.0 / 1001.0);
        let p = video_prompt(&t);
        assert!(p.starts_with("You are provided the following series of four frames from a 0:00:04 [H:MM:SS] video.\n\nFrame from 00:00:"));
        assert!(p.contains("\nFrame from 00:03:<fake_token_around_image><global-img><image><fake_token_around_image>\n\n"));
    }
}
