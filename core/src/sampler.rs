//! Token sampling, in llama.cpp's order: repetition penalty, top-k, top-p, min-p,
//! temperature, then a draw from the seeded RNG. Temperature 0 is greedy (argmax).

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

/// A sampler with its own RNG state.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = SplitMix64(cfg.seed);
        Self { cfg, rng }
    }

    pub fn is_greedy(&self) -> bool {
        self.cfg.temperature <= 0.0
    }

    /// Pick the next token from `logits`, given the tokens so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_penalty(&mut logits, history);
        if self.is_greedy() {
            return argmax(&logits);
        }
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.cfg.top_k > 0 {
            cand.truncate(self.cfg.top_k);
        }
        let probs = softmax(&cand, 1.0);
        let keep = nucleus_len(&probs, self.cfg.top_p);
        cand.truncate(keep);
        let p_max = probs[0];
        let keep = probs[..cand.len()].iter().take_while(|&&p| p >= self.cfg.min_p * p_max).count().max(1);
        cand.truncate(keep);
        let probs = softmax(&cand, self.cfg.temperature);
        let r = self.rng.next_f32();
        let mut acc = 0.0;
        for (c, p) in cand.iter().zip(&probs) {
            acc += p;
            if r < acc {
                return c.0;
            }
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }

    fn apply_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let rp = self.cfg.repeat_penalty;
        if rp == 1.0 {
            return;
        }
        let start = history.len().saturating_sub(self.cfg.repeat_last_n);
        let mut seen = history[start..].to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
        }
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(cand: &[(u32, f32)], temperature: f32) -> Vec<f32> {
    let max = cand.first().map(|c| c.1).unwrap_or(0.0);
    let e: Vec<f32> = cand.iter().map(|c| ((c.1 - max) / temperature).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Smallest prefix whose probability mass reaches `top_p` (at least one).
fn nucleus_len(probs: &[f32], top_p: f32) -> usize {
    if top_p >= 1.0 {
        return probs.len();
    }
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if acc >= top_p {
            return i + 1;
        }
    }
    probs.len()
}

/// Small, fast, seedable RNG (Steele et al., SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let cfg = SamplerConfig { temperature: 5.0, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 3.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let cfg = SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 7, ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..30).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..30).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 should vary");
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let cfg = SamplerConfig { repeat_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(cfg);
        assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1);
    }
}
