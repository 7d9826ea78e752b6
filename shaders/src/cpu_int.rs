//! The CPU's integer path for quantised weights.
//!
//! Each row of activations is quantised once per product to 16 bits in blocks of 32
//! ([`IntActs`]: `x ≈ d q`, `d = max|x| / 32767`). Each weight block is read as small
//! integer codes `c` with an affine map per group of 16 elements (`w = a c + b`,
//! [`IntCodes`]). Then, per group,
//!
//! ```text
//! sum_i w_i x_i = d (a sum_i c_i q_i + b sum_i q_i)
//! ```
//!
//! where `sum c q` runs in integer SIMD (AVX2's `vpmaddwd` on x86-64, `i32x4.dot_i16x8`
//! with WebAssembly's `simd128`, plain integer loops elsewhere) and `d sum q` is stored
//! with the activations. The codes are widened from bytes to 16 bits in registers; the
//! weights are read in their packed form once.
//!
//! Why 16 bits and not llama.cpp's 8: an 8-bit activation (error up to `max|x| / 254` per
//! element) moved a tiny Qwen2 quantised to Q8_0 off transformers' greedy choice where
//! its lead was 0.6 logits; at 16 bits the product stays close to the f32 one
//! (error up to `max|x| / 65534`), so the CPU answers as the GPU and the f32 reference
//! do, and the result does not depend on how a prompt is cut into prefill chunks. Nor do
//! llama.cpp's own 8-bit codes bring its tokens (tried, with every code equal to its
//! quantisers'): at 8 bits SmolLM2's logits move by 0.36 rms when the KV cache's
//! rounding changes (f32 to f16), against 0.003 at 16 bits, so matching llama.cpp's
//! codes would take bit-identical inputs to every product (README, "Speed").
//!
//! 8 bits are a choice ([`ActBits::Int8`], `--activations int8`), not the default: the
//! codes are llama.cpp's `quantize_row_q8_0`'s (the scale rounded to f16; per 32 for the
//! K-quants too, where llama.cpp's `q8_K` takes 256 with an f32 scale), kept both as i16
//! (what every kernel above reads, so every path computes the same integers) and as bytes
//! ([`ActBytes`]), which AVX-512 VNNI multiplies with `vpdpbusd`: 64 multiply-adds an
//! instruction against `vpdpwssd`'s 32. Prefill's products (`cpu_gemm_lanes.rs`) went
//! from 86-97 to 138-156 multiply-adds a ns on one Zen 4 thread, and a video's first token
//! (prefill and the vision tower's products) 1.17-1.46x sooner (README). Decode is
//! bound by reading the weights and gains little (`cpu_vnni.rs`). SmolLM2 Q4_1 still
//! meets llama.cpp's tokens where its lead is 0.5 (`llama_parity`), and a Q8_0 GGUF pair
//! transformers' (`smolvlm_parity`); the parity tests hold the 16-bit default.
//!
//! What this computes is exact for the quantised activations: the result equals the f64
//! product of the dequantised weights with [`IntActs::dequantize`] up to f32 rounding
//! (`tests/tests/kernels.rs` checks that bound).
//!
//! Every packed type but F16 / BF16 / F32 takes this path. Codes are unsigned bytes, or
//! signed ones for the types whose values are not an affine map of small codes (Q8_0,
//! IQ4_NL, IQ4_XS).

use vidllm_core::ggml::{
    Block, BlockIq4Nl, BlockIq4Xs, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    GgmlType, KVALUES_IQ4NL, QK, QK_K, blocks, k_scale_min, q3k_scale,
};

/// Elements per scale of the quantised activations.
pub(crate) const QB: usize = QK;
/// Elements per affine group of the weight codes (the smallest sub-block of any type).
pub(crate) const G: usize = 16;
/// Rows of activations sharing one decode of a weight block.
const MC: usize = 8;
/// The largest activation code.
const Q_MAX: f32 = 32767.0;
/// `x + ROUNDER - ROUNDER` is `x` rounded to the nearest integer, ties to even, in f32's
/// default rounding, for `|x| <= 2^22`.
const ROUNDER: f32 = 12582912.0;

/// `m` rows of `k` activations quantised to 16 bits in blocks of [`QB`].
///
/// # Shapes
/// - `qs`: `[m * k]`; `d`: `[m * k / 32]`; `dsums`: `[m * k / 16]` (`d` times the sum of
///   `qs`, per 16: what an offset `b` multiplies)
pub struct IntActs {
    pub k: usize,
    pub(crate) qs: Vec<i16>,
    pub(crate) d: Vec<f32>,
    pub(crate) dsums: Vec<f32>,
    /// At [`ActBits::Int8`], the codes again as bytes (they fit) with their integer sums,
    /// for the kernels that multiply bytes (`vpdpbusd`); the others read `qs`.
    pub(crate) bytes: Option<ActBytes>,
}

/// The 8-bit codes of [`IntActs`] as bytes.
///
/// # Shapes
/// - `qs`: `[m * k]`; `sums`: `[m * k / 16]` (the sum of `qs` per 16)
pub(crate) struct ActBytes {
    pub(crate) qs: Vec<i8>,
    pub(crate) sums: Vec<i32>,
}

/// How finely the integer path quantises a row of activations: each block of 32 values
/// becomes a scale and 32 codes of this many bits.
///
/// - `Int16` (the default): codes up to 32767, within `max|x| / 65534` of each value;
///   products close to the f32 ones, which is what the parity tests hold every backend to.
/// - `Int8`: llama.cpp's activations (`quantize_row_q8_0` / `_q8_1`, a scale rounded to
///   f16): codes up to 127, and the kernels that multiply bytes do twice the
///   multiply-adds an instruction (AVX-512 VNNI's `vpdpbusd` against `vpdpwssd`), which
///   is what prefill and the vision towers are bound by. The error per value grows to
///   `max|x| / 254` (see the module's doc for what that does to tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActBits {
    #[default]
    Int16,
    Int8,
}

impl ActBits {
    /// The flag this setting adds to a product's `kernels` id (`QuantOps::q_matmul`).
    pub const INT8_FLAG: u32 = 1 << 8;

    pub fn flag(self) -> u32 {
        match self {
            Self::Int16 => 0,
            Self::Int8 => Self::INT8_FLAG,
        }
    }

    pub fn from_kernels(kernels: u32) -> Self {
        if kernels & Self::INT8_FLAG != 0 { Self::Int8 } else { Self::Int16 }
    }
}

impl std::str::FromStr for ActBits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int16" => Ok(Self::Int16),
            "int8" => Ok(Self::Int8),
            other => Err(format!("unknown activation precision {other:?} (int16, int8)")),
        }
    }
}

impl IntActs {
    /// Quantise `x` (`[m, k]`, `k` a multiple of 32) to 16 bits per block of 32, as ggml's
    /// `quantize_row_q8_0` does to 8 (but ties round to even, not away from zero). Long
    /// inputs (prefill) are split over the thread pool.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        Self::quantize_to(x, k, ActBits::Int16)
    }

    /// [`IntActs::quantize`] at `bits`. At [`ActBits::Int8`] the codes are llama.cpp's x86
    /// `quantize_row_q8_0` / `_q8_1` ones: `d = max|x| / 127` rounded to f16 (the scale
    /// the products use), codes `x * 127 / max|x|` rounded to nearest, ties to even.
    pub fn quantize_to(x: &[f32], k: usize, bits: ActBits) -> Self {
        assert!(k.is_multiple_of(QB) && x.len().is_multiple_of(k), "IntActs: rows of a multiple of 32");
        let eight = bits == ActBits::Int8;
        let mut qs = vec![0i16; x.len()];
        let mut d = vec![0f32; x.len() / QB];
        let mut dsums = vec![0f32; x.len() / G];
        let (mut q8, mut sums) = if eight { (vec![0i8; x.len()], vec![0i32; x.len() / G]) } else { (Vec::new(), Vec::new()) };
        // Large ones are fresh mappings, untouched by calloc: advised before the writes below.
        crate::cpu_pages::advise_huge(&mut qs);
        crate::cpu_pages::advise_huge(&mut q8);
        // Blocks per task: a decode row is not worth waking the pool for.
        const TASK: usize = 256;
        if x.len() >= 4 * TASK * QB {
            use rayon::prelude::*;
            let runs = x
                .par_chunks(TASK * QB)
                .zip(qs.par_chunks_mut(TASK * QB))
                .zip(d.par_chunks_mut(TASK))
                .zip(dsums.par_chunks_mut(TASK * QB / G));
            if eight {
                runs.zip(q8.par_chunks_mut(TASK * QB)).zip(sums.par_chunks_mut(TASK * QB / G)).for_each(
                    |(((((x, qs), d), dsums), q8), sums)| quantize_blocks(x, Quantised { qs, d, dsums, bytes: Some((q8, sums)) }),
                );
            } else {
                runs.for_each(|(((x, qs), d), dsums)| quantize_blocks(x, Quantised { qs, d, dsums, bytes: None }));
            }
        } else {
            let bytes = eight.then_some((&mut q8[..], &mut sums[..]));
            quantize_blocks(x, Quantised { qs: &mut qs, d: &mut d, dsums: &mut dsums, bytes });
        }
        IntActs { k, qs, d, dsums, bytes: eight.then_some(ActBytes { qs: q8, sums }) }
    }

    /// The activations the integer kernels multiply: `d q`, as f32.
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().enumerate().map(|(i, &q)| self.d[i / QB] * q as f32).collect()
    }

    pub(crate) fn rows(&self) -> usize {
        self.qs.len() / self.k
    }
}

/// Where a run of whole blocks of 32 is quantised to: [`IntActs`]'s parts for those blocks,
/// and at 8 bits their codes as bytes with the codes' sums per 16.
struct Quantised<'a> {
    qs: &'a mut [i16],
    d: &'a mut [f32],
    dsums: &'a mut [f32],
    bytes: Option<(&'a mut [i8], &'a mut [i32])>,
}

/// [`IntActs::quantize_to`] on whole blocks of 32 (8 bits where `out` takes bytes), on the
/// best instruction set available.
fn quantize_blocks(x: &[f32], out: Quantised) {
    let eight = out.bytes.is_some();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the features were just detected.
        return unsafe { if eight { avx2::quantize_blocks::<true>(x, out) } else { avx2::quantize_blocks::<false>(x, out) } };
    }
    if eight { quantize_blocks_generic::<true>(x, out) } else { quantize_blocks_generic::<false>(x, out) }
}

/// Written to vectorise: the maximum in lanes, and rounding to nearest, ties to even, by
/// adding and taking off 1.5 * 2^23 (exact below 2^22): `round_ties_even` is a call where
/// the target lacks SSE4.1's `roundps`, and the loop then does not vectorise.
#[inline(always)]
fn quantize_blocks_generic<const EIGHT: bool>(x: &[f32], out: Quantised) {
    let q_max = if EIGHT { 127.0 } else { Q_MAX };
    let Quantised { qs, d, dsums, mut bytes } = out;
    for (b, (((xb, qb), d), ds)) in
        x.chunks_exact(QB).zip(qs.chunks_exact_mut(QB)).zip(d.iter_mut()).zip(dsums.chunks_exact_mut(QB / G)).enumerate()
    {
        let mut lanes = [0f32; 8];
        for c in xb.chunks_exact(8) {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l = if v.abs() > *l { v.abs() } else { *l };
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &l| if l > a { l } else { a });
        let (scale, inv) = if EIGHT {
            (half::f16::from_f32(amax / 127.0).to_f32(), if amax > 0.0 { 127.0 / amax } else { 0.0 })
        } else {
            let scale = amax / Q_MAX;
            (scale, if scale > 0.0 { 1.0 / scale } else { 0.0 })
        };
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = ((v * inv).clamp(-q_max, q_max) + ROUNDER - ROUNDER) as i16;
        }
        *d = scale;
        for (h, (s, c)) in ds.iter_mut().zip(qb.chunks_exact(G)).enumerate() {
            let n = c.iter().map(|&q| q as i32).sum::<i32>();
            *s = scale * n as f32;
            if let Some((q8, sums)) = bytes.as_mut() {
                sums[2 * b + h] = n;
                q8[b * QB + h * G..][..G].iter_mut().zip(c).for_each(|(o, &q)| *o = q as i8);
            }
        }
    }
}

/// A weight block as integer codes: `w[i] = a[i / 16] * c[i] + b[i / 16]`.
pub trait IntCodes: Block {
    /// Codes are i8 (any sign); otherwise u8.
    const SIGNED: bool;
    /// Whether `b` can be non-zero (else the sums of the activations are not needed).
    const OFFSET: bool;
    /// Whether both halves of every 32 share one affine map (all but Q2_K, Q3_K, Q6_K,
    /// whose sub-blocks are 16): their products are then summed before scaling.
    const SHARED32: bool = true;
    /// Write the block's `ELEMS` codes into `c` and its affine maps into `a`, `b`.
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]);
}

/// An f16 scale as f32, inlined (the `half` crate's conversion is a call that checks the
/// processor's features each time: a tenth of the decode time for 32-element blocks).
#[inline(always)]
fn f16(b: [u8; 2]) -> f32 {
    let h = u16::from_le_bytes(b);
    let sign = ((h & 0x8000) as u32) << 16;
    let rest = (h & 0x7fff) as u32;
    if rest >= 0x7c00 {
        // Infinity or NaN: the exponent field all ones.
        return f32::from_bits(sign | 0x7f80_0000 | ((rest & 0x3ff) << 13));
    }
    // Exponent and mantissa moved into f32's fields, then rebiased (15 -> 127) by an exact
    // multiplication by 2^112; f16 subnormals come out right the same way.
    let magnitude = f32::from_bits(rest << 13) * f32::from_bits((127 + 112) << 23);
    f32::from_bits(magnitude.to_bits() | sign)
}

/// The 32 codes of a 4-bit block (low nibbles are elements 0-15, high nibbles 16-31).
#[inline(always)]
fn nibbles(qs: &[u8], c: &mut [u8]) {
    for j in 0..16 {
        c[j] = qs[j] & 15;
        c[j + 16] = qs[j] >> 4;
    }
}

/// The 32 IQ4 values of a block of nibbles (signed codes): each nibble looked up in the
/// non-linear table.
#[inline(always)]
fn iq4_values(qs: &[u8], c: &mut [u8]) {
    nibbles(qs, c);
    for v in &mut c[..QK] {
        *v = KVALUES_IQ4NL[*v as usize] as u8;
    }
}

/// The affine maps of Q4_K / Q5_K: eight sub-blocks of 32 (two groups of 16 each), with
/// 6-bit scales and minimums.
#[inline(always)]
fn k_scale_min_maps(scales: &[u8; 12], d: f32, dmin: f32, a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
    for s in 0..QK_K / QK {
        let (sc, m) = k_scale_min(scales, s);
        a[2 * s..2 * s + 2].fill(d * sc as f32);
        b[2 * s..2 * s + 2].fill(-dmin * m as f32);
    }
}

impl IntCodes for BlockQ4_0 {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        nibbles(&self.qs, c);
        let d = f16(self.d);
        a[..2].fill(d);
        b[..2].fill(-8.0 * d);
    }
}

impl IntCodes for BlockQ4_1 {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        nibbles(&self.qs, c);
        a[..2].fill(f16(self.d));
        b[..2].fill(f16(self.m));
    }
}

/// The 32 five-bit codes of a Q5 block: its nibbles and the bits of `qh`.
#[inline(always)]
fn q5_codes(qs: &[u8; QK / 2], qh: [u8; 4], c: &mut [u8]) {
    let qh = u32::from_le_bytes(qh);
    for j in 0..16 {
        c[j] = (qs[j] & 15) | ((((qh >> j) & 1) as u8) << 4);
        c[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
}

impl IntCodes for BlockQ5_0 {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        q5_codes(&self.qs, self.qh, c);
        let d = f16(self.d);
        a[..2].fill(d);
        b[..2].fill(-16.0 * d);
    }
}

impl IntCodes for BlockQ5_1 {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        q5_codes(&self.qs, self.qh, c);
        a[..2].fill(f16(self.d));
        b[..2].fill(f16(self.m));
    }
}

impl IntCodes for BlockQ8_0 {
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], _b: &mut [f32; QK_K / G]) {
        c[..QK].copy_from_slice(bytemuck::cast_slice(&self.qs));
        a[..2].fill(f16(self.d));
    }
}

impl IntCodes for BlockIq4Nl {
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], _b: &mut [f32; QK_K / G]) {
        iq4_values(&self.qs, c);
        a[..2].fill(f16(self.d));
    }
}

impl IntCodes for BlockQ2K {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    const SHARED32: bool = false;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        let (d, dmin) = (f16(self.d), f16(self.dmin));
        // Element h * 128 + s * 32 + l is the 2-bit field s of byte l of half h.
        for h in 0..2 {
            for s in 0..4 {
                for l in 0..32 {
                    c[128 * h + 32 * s + l] = (self.qs[32 * h + l] >> (2 * s)) & 3;
                }
            }
        }
        for (g, sc) in self.scales.iter().enumerate() {
            a[g] = d * (sc & 15) as f32;
            b[g] = -dmin * (sc >> 4) as f32;
        }
    }
}

impl IntCodes for BlockQ3K {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    const SHARED32: bool = false;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        let d = f16(self.d);
        // As Q2_K's fields, plus a high bit (stored inverted: clear means -4): code 0..7
        // is the value plus 4.
        for h in 0..2 {
            for s in 0..4 {
                for l in 0..32 {
                    let i = 128 * h + 32 * s + l;
                    let high = (self.hmask[l] >> (i / 32)) & 1;
                    c[i] = ((self.qs[32 * h + l] >> (2 * s)) & 3) | (high << 2);
                }
            }
        }
        for g in 0..QK_K / G {
            a[g] = d * (q3k_scale(&self.scales, g) as f32 - 32.0);
            b[g] = -4.0 * a[g];
        }
    }
}

impl IntCodes for BlockQ4K {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        // Chunk q of 64: sub-block 2q in the low nibbles of its 32 bytes, 2q + 1 in the high.
        for (cs, qs) in c.chunks_exact_mut(64).zip(self.qs.chunks_exact(32)) {
            for l in 0..32 {
                cs[l] = qs[l] & 15;
                cs[l + 32] = qs[l] >> 4;
            }
        }
        k_scale_min_maps(&self.scales, f16(self.d), f16(self.dmin), a, b);
    }
}

impl IntCodes for BlockQ5K {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        // As Q4_K, with sub-block s's fifth bits in bit s of `qh[l]`.
        for (q, (cs, qs)) in c.chunks_exact_mut(64).zip(self.qs.chunks_exact(32)).enumerate() {
            for l in 0..32 {
                cs[l] = (qs[l] & 15) | (((self.qh[l] >> (2 * q)) & 1) << 4);
                cs[l + 32] = (qs[l] >> 4) | (((self.qh[l] >> (2 * q + 1)) & 1) << 4);
            }
        }
        k_scale_min_maps(&self.scales, f16(self.d), f16(self.dmin), a, b);
    }
}

impl IntCodes for BlockQ6K {
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    const SHARED32: bool = false;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], b: &mut [f32; QK_K / G]) {
        let d = f16(self.d);
        // Each half of 128: byte l of its ql / qh feeds elements l, l + 32, l + 64, l + 96
        // (low nibbles of ql[l], ql[l + 32], then their high nibbles; the 2-bit fields of
        // qh[l] in order). Codes 0..63 are the value plus 32.
        for h in 0..2 {
            let (ql, qh) = (&self.ql[64 * h..64 * h + 64], &self.qh[32 * h..32 * h + 32]);
            let cs = &mut c[128 * h..128 * h + 128];
            for l in 0..32 {
                cs[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
                cs[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                cs[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                cs[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        for (g, &sc) in self.scales.iter().enumerate() {
            a[g] = d * sc as f32;
            b[g] = -32.0 * a[g];
        }
    }
}

impl IntCodes for BlockIq4Xs {
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    fn codes(&self, c: &mut [u8; QK_K], a: &mut [f32; QK_K / G], _b: &mut [f32; QK_K / G]) {
        let d = f16(self.d);
        let high = u16::from_le_bytes(self.scales_h);
        for (j, cs) in c.chunks_exact_mut(QK).enumerate() {
            let ls = ((self.scales_l[j / 2] >> (4 * (j % 2))) & 15) | ((((high >> (2 * j)) & 3) as u8) << 4);
            a[2 * j..2 * j + 2].fill(d * (ls as f32 - 32.0));
            iq4_values(&self.qs[16 * j..16 * j + 16], cs);
        }
    }
}

/// Whether `ty` takes the integer path (every block type; not the float ones).
pub fn takes_integer_path(ty: GgmlType) -> bool {
    ty.is_quantized()
}

/// `out[i] = W_row . x_i` for every row `i` of `acts`, with `W_row` one row of `ty` blocks.
///
/// # Panics
/// If `wrow` is not one row of `acts.k` elements, or `out` is not one value per row.
pub fn row_dot(ty: GgmlType, wrow: &[u8], acts: &IntActs, out: &mut [f32]) {
    // The SIMD loops read by pointer within these bounds.
    assert!(acts.k.is_multiple_of(ty.block_elems()) && wrow.len() == acts.k / ty.block_elems() * ty.block_bytes(), "row_dot: not one row");
    assert!(acts.qs.len() == out.len() * acts.k, "row_dot: one output per row of activations");
    vidllm_core::with_block!(ty, B => row_dot_typed::<B>(wrow, acts, out), else unreachable!("float types take the f32 path"))
}

/// On the best instruction set available.
#[inline(always)]
fn row_dot_typed<B: IntCodes>(wrow: &[u8], acts: &IntActs, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the features were just detected.
        return unsafe { avx2::row_dot::<B>(wrow, acts, out) };
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return simd128::row_dot::<B>(wrow, acts, out);
    #[allow(unreachable_code)]
    rows_dot_scalar::<B>(wrow, acts, out)
}

/// The integer dot products of one 32-element chunk, by halves of 16.
#[inline(always)]
fn scalar_chunk<B: IntCodes>(c: &[u8], q: &[i16]) -> [i32; 2] {
    let mut s = [0i32; 2];
    for (h, sh) in s.iter_mut().enumerate() {
        for j in 16 * h..16 * h + 16 {
            let w = if B::SIGNED { c[j] as i8 as i32 } else { c[j] as i32 };
            *sh += w * q[j] as i32;
        }
    }
    s
}

/// The portable loop: each weight block decoded once into codes, then dotted with up to
/// [`MC`] rows of activations, 32 elements at a time, in integer loops.
#[inline(always)]
fn rows_dot_scalar<B: IntCodes>(wrow: &[u8], acts: &IntActs, out: &mut [f32]) {
    let k = acts.k;
    let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
    for r0 in (0..acts.rows()).step_by(MC) {
        let mc = MC.min(acts.rows() - r0);
        let mut acc = [0f32; MC];
        for (bi, blk) in blocks::<B>(wrow).iter().enumerate() {
            blk.codes(&mut c, &mut a, &mut b);
            for (i, acc) in acc[..mc].iter_mut().enumerate() {
                let e0 = (r0 + i) * k + bi * B::ELEMS;
                for ch in 0..B::ELEMS / QB {
                    let e = e0 + ch * QB;
                    let [s0, s1] = scalar_chunk::<B>(&c[ch * QB..ch * QB + QB], &acts.qs[e..e + QB]);
                    *acc += acts.d[e / QB] * (a[2 * ch] * s0 as f32 + a[2 * ch + 1] * s1 as f32);
                    if B::OFFSET {
                        *acc += b[2 * ch] * acts.dsums[e / G] + b[2 * ch + 1] * acts.dsums[e / G + 1];
                    }
                }
            }
        }
        out[r0..r0 + mc].copy_from_slice(&acc[..mc]);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// AVX2: per chunk of 32, the codes widened to i16 and `vpmaddwd` with the activations
    /// ([`products`]); each half scaled and accumulated in f32 lanes; one horizontal sum
    /// per row at the end. The 32-element types build their
    /// codes in a register ([`codes32`]); the K types go through the code buffer. (From 4
    /// rows on, x86-64 takes the tiled GEMM of `cpu_gemm.rs` instead.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dot<B: IntCodes>(wrow: &[u8], acts: &IntActs, out: &mut [f32]) {
        if B::ELEMS == QB && acts.rows() == 1 {
            out[0] = unsafe { row_dot_32::<B>(wrow, acts) };
            return;
        }
        let k = acts.k;
        let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
        let (qs, d, dsums) = (acts.qs.as_ptr(), acts.d.as_ptr(), acts.dsums.as_ptr());
        for r0 in (0..acts.rows()).step_by(MC) {
            let mc = MC.min(acts.rows() - r0);
            let mut acc = [_mm256_setzero_ps(); MC];
            let mut off = [0f32; MC];
            for (bi, blk) in blocks::<B>(wrow).iter().enumerate() {
                blk.codes(&mut c, &mut a, &mut b);
                for i in 0..mc {
                    let e0 = (r0 + i) * k + bi * B::ELEMS;
                    for ch in 0..B::ELEMS / QB {
                        let e = e0 + ch * QB;
                        // SAFETY: `e + 32 <= m * k` (whole blocks of whole rows), and the
                        // code buffer holds a whole block.
                        unsafe {
                            let w = _mm256_loadu_si256(c.as_ptr().add(ch * QB) as *const __m256i);
                            let (p0, p1) = products::<B>(w, qs.add(e));
                            let dx = *d.add(e / QB);
                            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(dx * a[2 * ch]), acc[i]);
                            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(dx * a[2 * ch + 1]), acc[i]);
                            if B::OFFSET {
                                off[i] += b[2 * ch] * *dsums.add(e / G) + b[2 * ch + 1] * *dsums.add(e / G + 1);
                            }
                        }
                    }
                }
            }
            for i in 0..mc {
                out[r0 + i] = hsum(acc[i]) + off[i];
            }
        }
    }

    /// 32 codes widened to two vectors of 16 i16 (elements 0-15, 16-31).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn widen<B: IntCodes>(w: __m256i) -> (__m256i, __m256i) {
        let (lo, hi) = (_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
        if B::SIGNED { (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi)) } else { (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi)) }
    }

    /// One row of 32-element blocks against one row of activations (decode), codes built
    /// in a register, one scale per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_dot_32<B: IntCodes>(wrow: &[u8], acts: &IntActs) -> f32 {
        let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
        // Two accumulators (even and odd blocks): one would chain every block's FMA on
        // the one before it.
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut off = [0f32; 2];
        for (bi, blk) in blocks::<B>(wrow).iter().enumerate() {
            let e = bi * QB;
            // SAFETY: block `bi` of the row lies inside the activations' one row.
            unsafe {
                let (w, scale, offset) = match codes32(blk) {
                    Some(fast) => fast,
                    None => {
                        blk.codes(&mut c, &mut a, &mut b);
                        (_mm256_loadu_si256(c.as_ptr() as *const __m256i), a[0], b[0])
                    }
                };
                let (p0, p1) = products::<B>(w, acts.qs.as_ptr().add(e));
                let s = _mm256_set1_ps(*acts.d.get_unchecked(bi) * scale);
                // One scale for the block: the halves summed in i32 (at most 2^25).
                acc[bi % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), s, acc[bi % 2]);
                if B::OFFSET {
                    off[bi % 2] += offset * (*acts.dsums.get_unchecked(2 * bi) + *acts.dsums.get_unchecked(2 * bi + 1));
                }
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) + off[0] + off[1]
    }

    /// The 32 codes, scale and offset of a 32-element block straight into a register, for
    /// the types where that is a few instructions; `None` for the others.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn codes32<B: IntCodes>(blk: &B) -> Option<(__m256i, f32, f32)> {
        let bytes = bytemuck::bytes_of(blk);
        // Low nibbles are elements 0-15, high nibbles 16-31.
        let nibbles = |qs: &[u8; 16]| {
            // SAFETY: 16 bytes.
            let q = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(15))
        };
        match B::TYPE {
            GgmlType::Q4_0 => {
                let b: &BlockQ4_0 = bytemuck::from_bytes(bytes);
                let d = f16c(b.d);
                Some((nibbles(&b.qs), d, -8.0 * d))
            }
            GgmlType::Q4_1 => {
                let b: &BlockQ4_1 = bytemuck::from_bytes(bytes);
                Some((nibbles(&b.qs), f16c(b.d), f16c(b.m)))
            }
            GgmlType::Q5_0 => {
                let b: &BlockQ5_0 = bytemuck::from_bytes(bytes);
                let d = f16c(b.d);
                Some((fifth_bits(nibbles(&b.qs), b.qh), d, -16.0 * d))
            }
            GgmlType::Q5_1 => {
                let b: &BlockQ5_1 = bytemuck::from_bytes(bytes);
                Some((fifth_bits(nibbles(&b.qs), b.qh), f16c(b.d), f16c(b.m)))
            }
            GgmlType::Q8_0 => {
                let b: &BlockQ8_0 = bytemuck::from_bytes(bytes);
                // SAFETY: 32 bytes.
                Some((unsafe { _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i) }, f16c(b.d), 0.0))
            }
            GgmlType::Iq4Nl => {
                let b: &BlockIq4Nl = bytemuck::from_bytes(bytes);
                // The 16 values looked up by nibble in one shuffle per half.
                // SAFETY: 16 bytes.
                let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
                let idx = nibbles(&b.qs);
                let values = _mm256_shuffle_epi8(_mm256_set_m128i(table, table), idx);
                Some((values, f16c(b.d), 0.0))
            }
            _ => None,
        }
    }

    /// Q5 codes from their nibbles (`c`, element j in byte j) and `qh`, whose bit j is element
    /// j's fifth bit: each byte takes its element's byte of `qh` (one shuffle), keeps its
    /// bit, and adds 16 where it is set ([`q5_codes`] in registers).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn fifth_bits(c: __m256i, qh: [u8; 4]) -> __m256i {
        let at = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(i32::from_le_bytes(qh)), at);
        // Byte k of each 8 tests bit k.
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        _mm256_or_si256(c, _mm256_and_si256(set, _mm256_set1_epi8(16)))
    }

    /// The products of 32 codes with 32 activations (at `x`), as two vectors of 8 i32 sums
    /// of pairs: elements 0-15 and 16-31. The codes are widened to 16 bits, then
    /// `vpmaddwd` (i16 x i16, pairs summed to i32).
    ///
    /// # Safety
    /// `x` points at 32 readable i16.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn products<B: IntCodes>(w: __m256i, x: *const i16) -> (__m256i, __m256i) {
        let (wl, wh) = widen::<B>(w);
        // SAFETY: 32 i16 at `x`.
        let (xl, xh) = unsafe { (_mm256_loadu_si256(x as *const __m256i), _mm256_loadu_si256(x.add(16) as *const __m256i)) };
        (_mm256_madd_epi16(wl, xl), _mm256_madd_epi16(wh, xh))
    }

    /// An f16 scale as f32 by the F16C instruction.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn f16c(b: [u8; 2]) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes(b) as i32)))
    }

    /// [`quantize_blocks_generic`] in registers, to the bit (`tests::quantisers_agree`): a
    /// block's four vectors give its maximum magnitude in a tree; each value is scaled,
    /// clamped and converted with the processor's rounding (ties to even, the default
    /// mode), then packed to i16 (and at 8 bits to bytes). Left to the compiler, the loop
    /// converted and stored one value at a time: quantising took a twentieth of a prefill
    /// at 16 bits, and a fifth of a video prefill at 8.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn quantize_blocks<const EIGHT: bool>(x: &[f32], out: Quantised) {
        let sign = _mm256_set1_ps(-0.0);
        let q_max = if EIGHT { 127.0 } else { Q_MAX };
        let (hi, lo) = (_mm256_set1_ps(q_max), _mm256_set1_ps(-q_max));
        let Quantised { qs, d, dsums, mut bytes } = out;
        let blocks = x.chunks_exact(QB).zip(qs.chunks_exact_mut(QB)).zip(d.iter_mut()).zip(dsums.chunks_exact_mut(QB / G));
        for (b, (((xb, qb), d), ds)) in blocks.enumerate() {
            // SAFETY: a block is 32 values and 32 codes of each width.
            unsafe {
                let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xb.as_ptr().add(8 * i)));
                let a: [__m256; 4] = v.map(|v| _mm256_andnot_ps(sign, v));
                let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                let (scale, inv) = if EIGHT {
                    // llama.cpp's scale is stored as f16, and that is the one the products use.
                    let h = _mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(amax / 127.0));
                    (_mm_cvtss_f32(_mm_cvtph_ps(h)), if amax > 0.0 { 127.0 / amax } else { 0.0 })
                } else {
                    let scale = amax / Q_MAX;
                    (scale, if scale > 0.0 { 1.0 / scale } else { 0.0 })
                };
                let inv = _mm256_set1_ps(inv);
                // A scale so small that its inverse is infinite makes `0 * inv` NaN, which
                // the scalar loop's `as i16` turns into 0: so do the masks.
                let q: [__m256i; 4] = v.map(|v| {
                    let p = _mm256_mul_ps(v, inv);
                    let p = _mm256_and_ps(p, _mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
                    _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(p, hi), lo))
                });
                // `packs` interleaves 128-bit lanes: elements 0-3, 8-11, 4-7, 12-15; the
                // permute puts them back in order (and the bytes' quarters likewise).
                let h0 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
                let h1 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[2], q[3]));
                _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, h0);
                _mm256_storeu_si256(qb.as_mut_ptr().add(16) as *mut __m256i, h1);
                if let Some((q8, _)) = bytes.as_mut() {
                    let c = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(h0, h1));
                    _mm256_storeu_si256(q8[b * QB..][..QB].as_mut_ptr() as *mut __m256i, c);
                }
                *d = scale;
                for (h, (s, v)) in ds.iter_mut().zip([_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])]).enumerate() {
                    let t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                    let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
                    let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
                    let n = _mm_cvtsi128_si32(t);
                    *s = scale * n as f32;
                    if let Some((_, sums)) = bytes.as_mut() {
                        sums[2 * b + h] = n;
                    }
                }
            }
        }
    }

    /// The sum of the 8 lanes (AVX alone: every caller's features include it).
    #[target_feature(enable = "avx")]
    #[inline]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    use std::arch::wasm32::*;

    use super::*;

    /// WebAssembly SIMD: codes widened to i16, `i32x4.dot_i16x8` with the activations
    /// (pairs multiplied and summed to i32); per half of 16, four i32 lanes, scaled in f32
    /// lanes.
    pub(super) fn row_dot<B: IntCodes>(wrow: &[u8], acts: &IntActs, out: &mut [f32]) {
        if B::ELEMS == QB && acts.rows() == 1 {
            out[0] = row_dot_32::<B>(wrow, acts);
            return;
        }
        let k = acts.k;
        let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
        for r0 in (0..acts.rows()).step_by(MC) {
            let mc = MC.min(acts.rows() - r0);
            let mut acc = [f32x4_splat(0.0); MC];
            let mut off = [0f32; MC];
            for (bi, blk) in blocks::<B>(wrow).iter().enumerate() {
                blk.codes(&mut c, &mut a, &mut b);
                for i in 0..mc {
                    let e0 = (r0 + i) * k + bi * B::ELEMS;
                    for ch in 0..B::ELEMS / QB {
                        let e = e0 + ch * QB;
                        let dx = acts.d[e / QB];
                        for h in 0..2 {
                            let at = ch * QB + 16 * h;
                            // SAFETY: 16 codes inside the buffer, 16 activations inside the row.
                            let (w, xl, xh) = unsafe {
                                let x = acts.qs.as_ptr().add(e + 16 * h);
                                (
                                    v128_load(c.as_ptr().add(at) as *const v128),
                                    v128_load(x as *const v128),
                                    v128_load(x.add(8) as *const v128),
                                )
                            };
                            let (wl, wh) = if B::SIGNED {
                                (i16x8_extend_low_i8x16(w), i16x8_extend_high_i8x16(w))
                            } else {
                                (u16x8_extend_low_u8x16(w), u16x8_extend_high_u8x16(w))
                            };
                            let p = i32x4_add(i32x4_dot_i16x8(wl, xl), i32x4_dot_i16x8(wh, xh));
                            acc[i] = f32x4_add(acc[i], f32x4_mul(f32x4_convert_i32x4(p), f32x4_splat(dx * a[2 * ch + h])));
                        }
                        if B::OFFSET {
                            off[i] += b[2 * ch] * acts.dsums[e / G] + b[2 * ch + 1] * acts.dsums[e / G + 1];
                        }
                    }
                }
            }
            for i in 0..mc {
                let v = acc[i];
                out[r0 + i] = f32x4_extract_lane::<0>(v)
                    + f32x4_extract_lane::<1>(v)
                    + f32x4_extract_lane::<2>(v)
                    + f32x4_extract_lane::<3>(v)
                    + off[i];
            }
        }
    }

    /// One row of 32-element blocks against one row of activations (decode): the codes
    /// built in registers ([`codes32`]), one scale per block, two accumulators.
    fn row_dot_32<B: IntCodes>(wrow: &[u8], acts: &IntActs) -> f32 {
        let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
        let mut acc = [f32x4_splat(0.0); 2];
        let mut off = [0f32; 2];
        let (qs, d, dsums) = (&acts.qs[..acts.k], &acts.d[..acts.k / QB], &acts.dsums[..acts.k / G]);
        for (bi, ((blk, x), (dx, ds))) in
            blocks::<B>(wrow).iter().zip(qs.chunks_exact(QB)).zip(d.iter().zip(dsums.chunks_exact(2))).enumerate()
        {
            let (lo, hi, scale, offset) = match codes32(blk) {
                Some(fast) => fast,
                None => {
                    blk.codes(&mut c, &mut a, &mut b);
                    // SAFETY: 32 bytes in the code buffer.
                    unsafe { (v128_load(c.as_ptr() as *const v128), v128_load(c.as_ptr().add(16) as *const v128), a[0], b[0]) }
                }
            };
            let widen = |v: v128| {
                if B::SIGNED {
                    (i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v))
                } else {
                    (u16x8_extend_low_u8x16(v), u16x8_extend_high_u8x16(v))
                }
            };
            let ((w0, w1), (w2, w3)) = (widen(lo), widen(hi));
            // SAFETY: the chunk holds 32 i16.
            let p = unsafe {
                let x = x.as_ptr() as *const v128;
                i32x4_add(
                    i32x4_add(i32x4_dot_i16x8(w0, v128_load(x)), i32x4_dot_i16x8(w1, v128_load(x.add(1)))),
                    i32x4_add(i32x4_dot_i16x8(w2, v128_load(x.add(2))), i32x4_dot_i16x8(w3, v128_load(x.add(3)))),
                )
            };
            // Even and odd blocks in two accumulators.
            let n = bi % 2;
            acc[n] = f32x4_add(acc[n], f32x4_mul(f32x4_convert_i32x4(p), f32x4_splat(dx * scale)));
            if B::OFFSET {
                off[n] += offset * (ds[0] + ds[1]);
            }
        }
        let v = f32x4_add(acc[0], acc[1]);
        f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v) + f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v) + off[0] + off[1]
    }

    /// Q5 codes from their nibbles (elements 0-15, 16-31) and `qh`, whose bit j is element
    /// j's fifth bit: each byte takes its element's byte of `qh` (a swizzle), keeps its bit,
    /// and adds 16 where it is set ([`q5_codes`] in registers).
    #[inline(always)]
    fn fifth_bits((lo, hi): (v128, v128), qh: [u8; 4]) -> (v128, v128) {
        let qh = u32x4_splat(u32::from_le_bytes(qh));
        let bit = u8x16(1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128);
        let with = |c: v128, at: v128| {
            let b = v128_and(i8x16_swizzle(qh, at), bit);
            v128_or(c, v128_and(i8x16_eq(b, bit), u8x16_splat(16)))
        };
        (with(lo, u8x16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)), with(hi, u8x16(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3)))
    }

    /// The 32 codes (elements 0-15, 16-31), scale and offset of a 32-element block in
    /// registers, for the types where that is a few instructions; `None` for the others.
    #[inline(always)]
    fn codes32<B: IntCodes>(blk: &B) -> Option<(v128, v128, f32, f32)> {
        let bytes = bytemuck::bytes_of(blk);
        // Low nibbles are elements 0-15, high nibbles 16-31.
        let nibbles = |qs: &[u8; 16]| {
            // SAFETY: 16 bytes.
            let q = unsafe { v128_load(qs.as_ptr() as *const v128) };
            (v128_and(q, u8x16_splat(15)), u8x16_shr(q, 4))
        };
        match B::TYPE {
            GgmlType::Q4_0 => {
                let b: &BlockQ4_0 = bytemuck::from_bytes(bytes);
                let ((lo, hi), d) = (nibbles(&b.qs), f16(b.d));
                Some((lo, hi, d, -8.0 * d))
            }
            GgmlType::Q4_1 => {
                let b: &BlockQ4_1 = bytemuck::from_bytes(bytes);
                let (lo, hi) = nibbles(&b.qs);
                Some((lo, hi, f16(b.d), f16(b.m)))
            }
            GgmlType::Q5_0 => {
                let b: &BlockQ5_0 = bytemuck::from_bytes(bytes);
                let ((lo, hi), d) = (fifth_bits(nibbles(&b.qs), b.qh), f16(b.d));
                Some((lo, hi, d, -16.0 * d))
            }
            GgmlType::Q5_1 => {
                let b: &BlockQ5_1 = bytemuck::from_bytes(bytes);
                let (lo, hi) = fifth_bits(nibbles(&b.qs), b.qh);
                Some((lo, hi, f16(b.d), f16(b.m)))
            }
            GgmlType::Q8_0 => {
                let b: &BlockQ8_0 = bytemuck::from_bytes(bytes);
                // SAFETY: 32 bytes.
                let (lo, hi) = unsafe { (v128_load(b.qs.as_ptr() as *const v128), v128_load(b.qs.as_ptr().add(16) as *const v128)) };
                Some((lo, hi, f16(b.d), 0.0))
            }
            GgmlType::Iq4Nl => {
                let b: &BlockIq4Nl = bytemuck::from_bytes(bytes);
                // SAFETY: 16 bytes.
                let table = unsafe { v128_load(KVALUES_IQ4NL.as_ptr() as *const v128) };
                let (lo, hi) = nibbles(&b.qs);
                Some((i8x16_swizzle(table, lo), i8x16_swizzle(table, hi), f16(b.d), 0.0))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidllm_core::ggml::dequant_block;

    /// 8-bit activations as llama.cpp's x86 `quantize_row_q8_0` makes them: the scale is
    /// `max|x| / 127` rounded to f16, the codes `x * 127 / max|x|` rounded to nearest with
    /// ties to even (a block whose values are exact halves checks the ties), the bytes and
    /// the 16-bit codes equal, and the sums per 16 those of the codes. Long inputs split
    /// over the pool give the same codes as short ones.
    #[test]
    fn eight_bit_activations_are_llama_cpp_codes() {
        let mut x = crate::check::values(5 * 4096, 7);
        // Block 0: max 127, so the codes are x * 1, and x holds halves: ties.
        for (i, v) in x[..QB].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        x[0] = 127.0;
        x[1..QB].iter_mut().for_each(|v| *v = v.clamp(-120.0, 120.0));
        x[QB..2 * QB].fill(0.0);
        let k = 4096;
        let acts = IntActs::quantize_to(&x, k, ActBits::Int8);
        let bytes = acts.bytes.as_ref().unwrap();
        for (b, xb) in x.chunks_exact(QB).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(acts.d[b], half::f16::from_f32(amax / 127.0).to_f32(), "block {b}");
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (i, &v) in xb.iter().enumerate() {
                let want = (v * id).round_ties_even() as i16;
                assert_eq!(acts.qs[b * QB + i], want, "block {b} value {i} ({v})");
                assert_eq!(bytes.qs[b * QB + i] as i16, want);
            }
            for h in 0..2 {
                let sum: i32 = acts.qs[b * QB + h * G..][..G].iter().map(|&q| q as i32).sum();
                assert_eq!(bytes.sums[2 * b + h], sum);
                assert_eq!(acts.dsums[2 * b + h], acts.d[b] * sum as f32);
            }
        }
        assert_eq!(acts.qs[..8], [127, -8, -7, -6, -6, -6, -5, -4], "ties to even");
        let one_row = IntActs::quantize_to(&x[..k], k, ActBits::Int8);
        assert_eq!(one_row.qs, acts.qs[..k]);
        // The portable loop (WebAssembly's, other architectures') gives the same.
        let n = x.len();
        let (mut qs, mut q8, mut d, mut dsums, mut sums) = (vec![0; n], vec![0; n], vec![0.0; n / QB], vec![0.0; n / G], vec![0; n / G]);
        quantize_blocks_generic::<true>(&x, Quantised { qs: &mut qs, d: &mut d, dsums: &mut dsums, bytes: Some((&mut q8, &mut sums)) });
        assert_eq!((qs, q8, d, dsums, sums), (acts.qs.clone(), bytes.qs.clone(), acts.d.clone(), acts.dsums.clone(), bytes.sums.clone()));
    }

    #[test]
    fn f16_conversion_is_exact() {
        for h in 0..=u16::MAX {
            let (want, got) = (half::f16::from_bits(h).to_f32(), f16(h.to_le_bytes()));
            assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{h:#06x}: {got} vs {want}");
        }
    }

    /// Codes and affine maps give back exactly what `Block::dequantize` gives, for every
    /// type, on random bytes (every bit pattern but the f16 scales is valid).
    #[test]
    fn codes_reproduce_dequantize() {
        for ty in GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t)) {
            let blocks = crate::check::weight(ty, 4, ty.block_elems(), 11);
            for blk in blocks.chunks_exact(ty.block_bytes()) {
                let mut want = vec![0f32; ty.block_elems()];
                dequant_block(ty, blk, &mut want);
                let got = vidllm_core::with_block!(ty, B => {
                    let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
                    bytemuck::from_bytes::<B>(blk).codes(&mut c, &mut a, &mut b);
                    (0..B::ELEMS).map(|i| {
                        let code = if B::SIGNED { c[i] as i8 as f32 } else { c[i] as f32 };
                        a[i / G] * code + if B::OFFSET { b[i / G] } else { 0.0 }
                    }).collect::<Vec<f32>>()
                }, else unreachable!());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{ty:?} element {i}: {g} vs {w}");
                }
            }
        }
    }

    /// The vectorised quantiser writes what the scalar one writes, bit for bit: values of
    /// every magnitude, ties (`x.5` after scaling), an all-zero block, blocks whose largest
    /// value is negative, subnormals, and a scale whose inverse overflows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn quantisers_agree() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")) {
            return;
        }
        let mut x: Vec<f32> =
            crate::check::values(64 * QB, 5).iter().enumerate().map(|(i, v)| v * 10f32.powi((i / QB) as i32 % 9 - 4)).collect();
        x[..QB].fill(0.0);
        // Scale 1: every other value a tie.
        x[QB..2 * QB].iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 * 7.5 - 120.0);
        x[QB] = Q_MAX;
        x[2 * QB] = -7.0;
        x[3 * QB..4 * QB].iter_mut().for_each(|v| *v *= 1e-40);
        // A subnormal scale with an infinite inverse, and zeros beside it.
        x[4 * QB..5 * QB].iter_mut().enumerate().for_each(|(i, v)| *v = if i % 3 == 0 { 0.0 } else { *v * 1e-36 });
        let n = x.len();
        let (mut qs, mut d, mut ds) = (vec![0i16; n], vec![0f32; n / QB], vec![0f32; n / G]);
        quantize_blocks_generic::<false>(&x, Quantised { qs: &mut qs, d: &mut d, dsums: &mut ds, bytes: None });
        let (mut qs2, mut d2, mut ds2) = (vec![0i16; n], vec![0f32; n / QB], vec![0f32; n / G]);
        // SAFETY: detected above.
        unsafe { avx2::quantize_blocks::<false>(&x, Quantised { qs: &mut qs2, d: &mut d2, dsums: &mut ds2, bytes: None }) };
        assert_eq!(qs, qs2);
        assert_eq!(d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(ds.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), ds2.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    /// The scalar loop and every SIMD one the processor runs agree with the f64 product
    /// on the quantised activations.
    #[test]
    fn integer_rows_match_f64_on_quantised_activations() {
        // One row takes the decode loop, eleven the batched one (a group of 8, then 3).
        for (ty, m) in GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t)).flat_map(|t| [(t, 1), (t, 11)]) {
            // 32-element types: 18 blocks, SmolLM2's row length.
            let k = if ty.block_elems() == QK { 18 * QK } else { 2 * QK_K };
            let w = crate::check::weight(ty, 1, k, 5);
            let x = crate::check::values(m * k, 9);
            let acts = IntActs::quantize(&x, k);
            let (xq, wf) = (acts.dequantize(), vidllm_core::ggml::dequantize(ty, &w, k));
            let mut got = vec![0f32; m];
            row_dot(ty, &w, &acts, &mut got);
            let mut scalar = vec![0f32; m];
            vidllm_core::with_block!(ty, B => rows_dot_scalar::<B>(&w, &acts, &mut scalar), else unreachable!());
            #[allow(unused_mut)]
            let mut avx2 = scalar.clone();
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                // SAFETY: the features were just detected.
                vidllm_core::with_block!(ty, B => unsafe { avx2::row_dot::<B>(&w, &acts, &mut avx2) }, else unreachable!());
            }
            for i in 0..m {
                let want: f64 = (0..k).map(|t| xq[i * k + t] as f64 * wf[t] as f64).sum();
                let mag = want.abs().max(1.0) as f32;
                for (name, v) in [("best", got[i]), ("avx2", avx2[i]), ("scalar", scalar[i])] {
                    assert!(crate::check::within_rounding((v - want as f32).abs(), mag, k), "{ty:?} m={m} row {i} ({name}): {v} vs {want}");
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Time of one product of a decode step (one row of activations) per type and
    /// instruction set; run by hand, on one thread (`matvec` uses the pool):
    /// `RAYON_NUM_THREADS=1 [K=576] [ROWS=2048] [TYPE=q4_1] cargo test --release --workspace --lib decode_row_dot_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn decode_row_dot_speed() {
        type Pass<'a> = Box<dyn FnMut() + Send + 'a>;
        let n = std::env::var("ROWS").map_or(4096, |v| v.parse().unwrap());
        let k = std::env::var("K").map_or(1536, |v| v.parse().unwrap());
        let only = std::env::var("TYPE").ok();
        // This thread one of the pool's, as in vidllm-native: a product is not a handoff.
        // One pool for every type: a second one on this thread fails (CurrentThreadAlreadyInPool).
        let pool = rayon::ThreadPoolBuilder::new().use_current_thread().build().unwrap();
        for ty in GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t) && only.as_deref().is_none_or(|o| o == t.name())) {
            let w = crate::check::weight(ty, n, k, 5);
            let acts = IntActs::quantize(&crate::check::values(k, 9), k);
            let acts8 = IntActs::quantize_to(&crate::check::values(k, 9), k, ActBits::Int8);
            let rb = k / ty.block_elems() * ty.block_bytes();
            let mut out = [0f32];
            let mut out2 = [0f32];
            // Variants interleaved pass by pass, so that a neighbour's load falls on all of
            // them; the median and the quickest pass of each.
            let mut variants: Vec<(&str, Pass)> =
                vec![("row by row", Box::new(|| (0..n).for_each(|r| row_dot(ty, &w[r * rb..(r + 1) * rb], &acts, &mut out))))];
            #[cfg(target_arch = "x86_64")]
            variants.push((
                "avx2",
                Box::new(|| {
                    (0..n).for_each(|r| {
                        vidllm_core::with_block!(ty, B => unsafe { avx2::row_dot::<B>(&w[r * rb..(r + 1) * rb], &acts, &mut out2) }, else unreachable!())
                    })
                }),
            ));
            if crate::cpu_gemv::available() {
                use crate::cpu_gemv::{Kernel, matvec_with};
                variants.push(("AVX-512 matvec", Box::new(|| drop(matvec_with(ty, &w, n, &acts, Kernel::Widening)))));
                if crate::cpu_vnni::available() && crate::cpu_vnni::covers(ty) {
                    variants.push(("AVX-512 VNNI matvec", Box::new(|| drop(matvec_with(ty, &w, n, &acts, Kernel::Vnni)))));
                    variants.push(("same, 8-bit activations", Box::new(|| drop(matvec_with(ty, &w, n, &acts8, Kernel::Vnni)))));
                }
                if crate::cpu_repack::applies(ty, n, k) {
                    let mut packed = w.clone();
                    crate::cpu_repack::repack(ty, &mut packed[..n * rb], k / QB);
                    let packed = std::sync::Arc::new(packed);
                    let (p8, a16, a8) = (packed.clone(), &acts, &acts8);
                    variants.push(("repacked VNNI", Box::new(move || drop(crate::cpu_repack::matvec(ty, &packed, n, a16)))));
                    variants.push(("same, 8-bit activations", Box::new(move || drop(crate::cpu_repack::matvec(ty, &p8, n, a8)))));
                }
            }
            let passes = std::env::var("PASSES").map_or(101, |v| v.parse().unwrap());
            let mut times = vec![Vec::with_capacity(passes); variants.len()];
            pool.install(|| {
                for _ in 0..passes {
                    for ((_, f), t) in variants.iter_mut().zip(&mut times) {
                        let t0 = std::time::Instant::now();
                        f();
                        t.push(t0.elapsed().as_secs_f64() * 1e9 / (n * k) as f64 * 32.0);
                    }
                }
            });
            let report: Vec<String> = variants
                .iter()
                .zip(&mut times)
                .map(|((name, _), t)| {
                    t.sort_by(f64::total_cmp);
                    format!("{name} {:.2} (quickest {:.2})", t[t.len() / 2], t[0])
                })
                .collect();
            eprintln!("{:>7}: ns / 32 elements, median of {passes}: {}", ty.name(), report.join(", "));
        }
    }
}
