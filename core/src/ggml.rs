//! GGML tensor types and block layouts (the format weights keep on the device).
//!
//! Each quantised type is a `#[repr(C)]` struct, byte for byte as ggml's `ggml-common.h`
//! declares it, with its size checked at compile time against ggml's. The CPU kernels
//! read rows as slices of these structs; the GPU kernels take their byte offsets
//! ([`Layout`]) from the same declarations. Every field is a byte array, so blocks have
//! alignment 1 and a row is a slice of blocks wherever it starts in a file.
//!
//! 32-element blocks (scale `d`, minimum `m`, all f16):
//! - Q4_0 (18 B): x = (q4 - 8) d;  Q4_1 (20 B): x = q4 d + m
//! - Q5_0 (22 B): x = (q5 - 16) d; Q5_1 (24 B): x = q5 d + m (fifth bits in `qh`)
//! - Q8_0 (34 B): x = q8 d;        IQ4_NL (18 B): x = d KVALUES[q4]
//!
//! In a 32-element block, nibble j of `qs[j]` (low) is element j, the high nibble element
//! j + 16; bit j of `qh` is element j's fifth bit.
//!
//! 256-element "K" super-blocks of 8 sub-blocks of 32 (16 of 16 for Q2_K, Q3_K, Q6_K),
//! each sub-block with its own scale (and minimum), packed in `scales`:
//! - Q2_K (84 B): x = d sc q2 - dmin m;  Q3_K (110 B): x = d (sc - 32) (q2 - 4 [hmask bit 0])
//! - Q4_K (144 B), Q5_K (176 B): x = d sc q - dmin m, 6-bit sc and m
//! - Q6_K (210 B): x = d sc (q6 - 32), i8 sc; IQ4_XS (136 B): x = d (ls - 32) KVALUES[q4]

use rayon::prelude::*;
use std::mem::offset_of;

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

/// Elements per block of the 32-element types, and per sub-block of the K types.
pub const QK: usize = 32;
/// Elements per K super-block.
pub const QK_K: usize = 256;

/// The non-linear 4-bit grid of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// A quantised block type: its layout is the struct itself.
pub trait Block: Pod {
    const TYPE: GgmlType;
    /// Elements per block.
    const ELEMS: usize;

    /// The block's `ELEMS` values, in order.
    fn dequantize(&self, out: &mut [f32]);
}

#[inline]
fn f16_of(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

macro_rules! blocks {
    ($($(#[$doc:meta])* $name:ident ($bytes:literal bytes) { $($field:ident: $fty:ty),* $(,)? })*) => {$(
        $(#[$doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Pod, Zeroable)]
        pub struct $name {
            $(pub $field: $fty),*
        }
        // ggml's size for the type, and no padding (alignment 1).
        const _: () = assert!(size_of::<$name>() == $bytes && align_of::<$name>() == 1);
    )*};
}

blocks! {
    /// `block_q4_0`
    BlockQ4_0 (18 bytes) { d: [u8; 2], qs: [u8; QK / 2] }
    /// `block_q4_1`
    BlockQ4_1 (20 bytes) { d: [u8; 2], m: [u8; 2], qs: [u8; QK / 2] }
    /// `block_q5_0`
    BlockQ5_0 (22 bytes) { d: [u8; 2], qh: [u8; 4], qs: [u8; QK / 2] }
    /// `block_q5_1`
    BlockQ5_1 (24 bytes) { d: [u8; 2], m: [u8; 2], qh: [u8; 4], qs: [u8; QK / 2] }
    /// `block_q8_0`
    BlockQ8_0 (34 bytes) { d: [u8; 2], qs: [i8; QK] }
    /// `block_iq4_nl`
    BlockIq4Nl (18 bytes) { d: [u8; 2], qs: [u8; QK / 2] }
    /// `block_q2_K`: 16 sub-blocks of 16; `scales[i]` = m << 4 | sc (4 bits each).
    BlockQ2K (84 bytes) { scales: [u8; QK_K / 16], qs: [u8; QK_K / 4], d: [u8; 2], dmin: [u8; 2] }
    /// `block_q3_K`: 16 sub-blocks of 16, 6-bit scales packed in 12 bytes.
    BlockQ3K (110 bytes) { hmask: [u8; QK_K / 8], qs: [u8; QK_K / 4], scales: [u8; 12], d: [u8; 2] }
    /// `block_q4_K`: 8 sub-blocks of 32, 6-bit scales and minimums packed in 12 bytes.
    BlockQ4K (144 bytes) { d: [u8; 2], dmin: [u8; 2], scales: [u8; 12], qs: [u8; QK_K / 2] }
    /// `block_q5_K`
    BlockQ5K (176 bytes) { d: [u8; 2], dmin: [u8; 2], scales: [u8; 12], qh: [u8; QK_K / 8], qs: [u8; QK_K / 2] }
    /// `block_q6_K`: 16 sub-blocks of 16, i8 scales.
    BlockQ6K (210 bytes) { ql: [u8; QK_K / 2], qh: [u8; QK_K / 4], scales: [i8; QK_K / 16], d: [u8; 2] }
    /// `block_iq4_xs`: 8 sub-blocks of 32, 6-bit scales (low 4 bits in `scales_l`, high 2 in `scales_h`).
    BlockIq4Xs (136 bytes) { d: [u8; 2], scales_h: [u8; 2], scales_l: [u8; QK_K / 64], qs: [u8; QK_K / 2] }
}

/// Element `j` (0..32) of a 32-element block's 4-bit codes: low nibbles first.
#[inline]
fn nibble(qs: &[u8; QK / 2], j: usize) -> u8 {
    (qs[j % 16] >> (4 * (j / 16))) & 15
}

/// Sub-block `j`'s 6-bit scale and minimum in the 12 packed bytes of Q4_K / Q5_K:
/// bytes 0-3 hold sc 0-3 (low 6 bits), bytes 4-7 m 0-3; sub-blocks 4-7 take their low 4
/// bits from bytes 8-11 and their high 2 from the top bits of bytes 0-7.
#[inline]
pub fn k_scale_min(scales: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// Sub-block `j`'s (0..16) 6-bit scale in Q3_K's 12 packed bytes, before its offset of 32:
/// the low 4 bits are nibbles of bytes 0-7 (low nibbles first), the high 2 bits pairs of
/// bytes 8-11.
#[inline]
pub fn q3k_scale(scales: &[u8; 12], j: usize) -> u8 {
    let low = (scales[j % 8] >> (4 * (j / 8))) & 15;
    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    low | (high << 4)
}

impl Block for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const ELEMS: usize = QK;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_of(self.d);
        for (j, o) in out[..QK].iter_mut().enumerate() {
            *o = (nibble(&self.qs, j) as f32 - 8.0) * d;
        }
    }
}

impl Block for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const ELEMS: usize = QK;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (f16_of(self.d), f16_of(self.m));
        for (j, o) in out[..QK].iter_mut().enumerate() {
            *o = nibble(&self.qs, j) as f32 * d + m;
        }
    }
}

/// The 5-bit code of element `j` of a Q5_0 / Q5_1 block: its nibble and bit `j` of `qh`.
#[inline]
fn q5_split(nibble: u8, qh: u32, j: usize) -> u8 {
    nibble | ((((qh >> j) & 1) as u8) << 4)
}

impl Block for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const ELEMS: usize = QK;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_of(self.d);
        // Elements j and j + 16 share byte j: one pass over the bytes (vectorises).
        let qh = u32::from_le_bytes(self.qh);
        let (lo, hi) = out[..QK].split_at_mut(16);
        for j in 0..16 {
            lo[j] = (q5_split(self.qs[j] & 15, qh, j) as f32 - 16.0) * d;
            hi[j] = (q5_split(self.qs[j] >> 4, qh, j + 16) as f32 - 16.0) * d;
        }
    }
}

impl Block for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const ELEMS: usize = QK;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (f16_of(self.d), f16_of(self.m));
        let qh = u32::from_le_bytes(self.qh);
        let (lo, hi) = out[..QK].split_at_mut(16);
        for j in 0..16 {
            lo[j] = q5_split(self.qs[j] & 15, qh, j) as f32 * d + m;
            hi[j] = q5_split(self.qs[j] >> 4, qh, j + 16) as f32 * d + m;
        }
    }
}

impl Block for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const ELEMS: usize = QK;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_of(self.d);
        for (o, q) in out[..QK].iter_mut().zip(self.qs) {
            *o = q as f32 * d;
        }
    }
}

impl Block for BlockIq4Nl {
    const TYPE: GgmlType = GgmlType::Iq4Nl;
    const ELEMS: usize = QK;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_of(self.d);
        for (j, o) in out[..QK].iter_mut().enumerate() {
            *o = KVALUES_IQ4NL[nibble(&self.qs, j) as usize] as f32 * d;
        }
    }
}

/// Q2_K, Q3_K and Q6_K store element `i` of the super-block's two halves of 128 as
/// `i = half * 128 + shift * 32 + l`: the 2-bit field `shift` of byte `l` of that half's
/// 32 bytes (Q6_K's high bits the same way; its low nibbles `i = half * 128 + nib * 64 + l`).
#[inline]
fn crumb(qs: &[u8], i: usize) -> u8 {
    (qs[32 * (i / 128) + i % 32] >> (2 * ((i % 128) / 32))) & 3
}

impl Block for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2K;
    const ELEMS: usize = QK_K;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (f16_of(self.d), f16_of(self.dmin));
        for (i, o) in out[..QK_K].iter_mut().enumerate() {
            let sc = self.scales[i / 16];
            *o = d * (sc & 15) as f32 * crumb(&self.qs, i) as f32 - dmin * (sc >> 4) as f32;
        }
    }
}

impl Block for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3K;
    const ELEMS: usize = QK_K;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_of(self.d);
        for (i, o) in out[..QK_K].iter_mut().enumerate() {
            let sc = q3k_scale(&self.scales, i / 16) as f32 - 32.0;
            // The high bit is stored inverted: a clear bit subtracts 4.
            let high = (self.hmask[i % 32] >> (i / 32)) & 1;
            let q = crumb(&self.qs, i) as f32 - if high == 0 { 4.0 } else { 0.0 };
            *o = d * sc * q;
        }
    }
}

impl Block for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    const ELEMS: usize = QK_K;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (f16_of(self.d), f16_of(self.dmin));
        // Chunk c of 64 elements: sub-block 2c in the low nibbles of its 32 bytes, 2c + 1
        // in the high ones; one pass per chunk, scales hoisted (vectorises).
        for (c, (o, qs)) in out[..QK_K].chunks_exact_mut(64).zip(self.qs.chunks_exact(32)).enumerate() {
            let ((sc0, m0), (sc1, m1)) = (k_scale_min(&self.scales, 2 * c), k_scale_min(&self.scales, 2 * c + 1));
            let (d0, n0, d1, n1) = (d * sc0 as f32, dmin * m0 as f32, d * sc1 as f32, dmin * m1 as f32);
            let (lo, hi) = o.split_at_mut(32);
            for l in 0..32 {
                lo[l] = d0 * (qs[l] & 15) as f32 - n0;
                hi[l] = d1 * (qs[l] >> 4) as f32 - n1;
            }
        }
    }
}

impl Block for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    const ELEMS: usize = QK_K;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (f16_of(self.d), f16_of(self.dmin));
        // As Q4_K, with sub-block s's fifth bits in bit s of `qh[l]`.
        for (c, (o, qs)) in out[..QK_K].chunks_exact_mut(64).zip(self.qs.chunks_exact(32)).enumerate() {
            let ((sc0, m0), (sc1, m1)) = (k_scale_min(&self.scales, 2 * c), k_scale_min(&self.scales, 2 * c + 1));
            let (d0, n0, d1, n1) = (d * sc0 as f32, dmin * m0 as f32, d * sc1 as f32, dmin * m1 as f32);
            let (lo, hi) = o.split_at_mut(32);
            for l in 0..32 {
                let (h0, h1) = ((self.qh[l] >> (2 * c)) & 1, (self.qh[l] >> (2 * c + 1)) & 1);
                lo[l] = d0 * ((qs[l] & 15) | (h0 << 4)) as f32 - n0;
                hi[l] = d1 * ((qs[l] >> 4) | (h1 << 4)) as f32 - n1;
            }
        }
    }
}

impl Block for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    const ELEMS: usize = QK_K;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_of(self.d);
        // Each half of 128: byte l of its ql / qh feeds elements l, l + 32, l + 64, l + 96
        // (low nibbles of ql[l], ql[l + 32], then their high nibbles; the 2-bit fields of
        // qh[l] in order); one pass per half (vectorises).
        for h in 0..2 {
            let (ql, qh, sc) = (&self.ql[64 * h..64 * h + 64], &self.qh[32 * h..32 * h + 32], &self.scales[8 * h..8 * h + 8]);
            let o = &mut out[128 * h..128 * h + 128];
            for l in 0..32 {
                let s = l / 16;
                let q = |low: u8, shift: u32| ((low & 15) | (((qh[l] >> shift) & 3) << 4)) as f32 - 32.0;
                o[l] = d * sc[s] as f32 * q(ql[l], 0);
                o[l + 32] = d * sc[s + 2] as f32 * q(ql[l + 32], 2);
                o[l + 64] = d * sc[s + 4] as f32 * q(ql[l] >> 4, 4);
                o[l + 96] = d * sc[s + 6] as f32 * q(ql[l + 32] >> 4, 6);
            }
        }
    }
}

impl Block for BlockIq4Xs {
    const TYPE: GgmlType = GgmlType::Iq4Xs;
    const ELEMS: usize = QK_K;
    #[inline]
    fn dequantize(&self, out: &mut [f32]) {
        let d = f16_of(self.d);
        let high = u16::from_le_bytes(self.scales_h);
        for (j, sub) in out[..QK_K].chunks_exact_mut(QK).enumerate() {
            let ls = ((self.scales_l[j / 2] >> (4 * (j % 2))) & 15) | ((((high >> (2 * j)) & 3) as u8) << 4);
            let dl = d * (ls as f32 - 32.0);
            let qs: &[u8; 16] = self.qs[16 * j..16 * j + 16].try_into().expect("16 bytes");
            for (k, o) in sub.iter_mut().enumerate() {
                *o = dl * KVALUES_IQ4NL[nibble(qs, k) as usize] as f32;
            }
        }
    }
}

impl BlockQ4_0 {
    pub fn d(&self) -> f32 {
        f16_of(self.d)
    }
}

impl BlockQ4_1 {
    pub fn d(&self) -> f32 {
        f16_of(self.d)
    }

    pub fn m(&self) -> f32 {
        f16_of(self.m)
    }
}

impl BlockQ8_0 {
    pub fn d(&self) -> f32 {
        f16_of(self.d)
    }
}

/// A row (or any whole number of blocks) of `bytes` as typed blocks.
///
/// # Panics
/// If `bytes` is not a whole number of blocks (loaders check sizes first).
pub fn blocks<B: Block>(bytes: &[u8]) -> &[B] {
    bytemuck::cast_slice(bytes)
}

/// Byte offsets of a block's fields, for kernels that read blocks as bytes (the GPU's).
/// Fields a type lacks are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Layout {
    pub d: usize,
    /// `m` (Q4_1, Q5_1) or `dmin` (Q2_K, Q4_K, Q5_K).
    pub m: usize,
    pub scales: usize,
    /// IQ4_XS's high 2 bits of its sub-block scales (`scales_h`).
    pub scales_h: usize,
    pub qh: usize,
    /// `qs` (`ql` for Q6_K; `hmask` is `qh` for Q3_K).
    pub qs: usize,
}

/// The GGML tensor element types vidllm reads. Others are refused by name
/// ([`unsupported_type_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Iq4Nl,
    Iq4Xs,
}

impl GgmlType {
    pub const ALL: [GgmlType; 15] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::Iq4Nl,
        Self::Iq4Xs,
    ];

    /// Map the on-disk type id (`ggml_type`) to a supported type.
    pub const fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(Self::F32),
            1 => Some(Self::F16),
            2 => Some(Self::Q4_0),
            3 => Some(Self::Q4_1),
            6 => Some(Self::Q5_0),
            7 => Some(Self::Q5_1),
            8 => Some(Self::Q8_0),
            10 => Some(Self::Q2K),
            11 => Some(Self::Q3K),
            12 => Some(Self::Q4K),
            13 => Some(Self::Q5K),
            14 => Some(Self::Q6K),
            20 => Some(Self::Iq4Nl),
            23 => Some(Self::Iq4Xs),
            30 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// ggml's `enum ggml_type` value.
    pub const fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Iq4Nl => 20,
            Self::Iq4Xs => 23,
            Self::Bf16 => 30,
        }
    }

    /// Elements per block (1 for plain float types).
    pub const fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Iq4Nl => QK,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Iq4Xs => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 => size_of::<BlockQ4_0>(),
            Self::Q4_1 => size_of::<BlockQ4_1>(),
            Self::Q5_0 => size_of::<BlockQ5_0>(),
            Self::Q5_1 => size_of::<BlockQ5_1>(),
            Self::Q8_0 => size_of::<BlockQ8_0>(),
            Self::Q2K => size_of::<BlockQ2K>(),
            Self::Q3K => size_of::<BlockQ3K>(),
            Self::Q4K => size_of::<BlockQ4K>(),
            Self::Q5K => size_of::<BlockQ5K>(),
            Self::Q6K => size_of::<BlockQ6K>(),
            Self::Iq4Nl => size_of::<BlockIq4Nl>(),
            Self::Iq4Xs => size_of::<BlockIq4Xs>(),
        }
    }

    /// Where a block's fields sit, from the structs above.
    pub const fn layout(self) -> Layout {
        let z = Layout { d: 0, m: 0, scales: 0, scales_h: 0, qh: 0, qs: 0 };
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => z,
            Self::Q4_0 => Layout { d: offset_of!(BlockQ4_0, d), qs: offset_of!(BlockQ4_0, qs), ..z },
            Self::Q4_1 => Layout { d: offset_of!(BlockQ4_1, d), m: offset_of!(BlockQ4_1, m), qs: offset_of!(BlockQ4_1, qs), ..z },
            Self::Q5_0 => Layout { d: offset_of!(BlockQ5_0, d), qh: offset_of!(BlockQ5_0, qh), qs: offset_of!(BlockQ5_0, qs), ..z },
            Self::Q5_1 => Layout {
                d: offset_of!(BlockQ5_1, d),
                m: offset_of!(BlockQ5_1, m),
                qh: offset_of!(BlockQ5_1, qh),
                qs: offset_of!(BlockQ5_1, qs),
                ..z
            },
            Self::Q8_0 => Layout { d: offset_of!(BlockQ8_0, d), qs: offset_of!(BlockQ8_0, qs), ..z },
            Self::Iq4Nl => Layout { d: offset_of!(BlockIq4Nl, d), qs: offset_of!(BlockIq4Nl, qs), ..z },
            Self::Q2K => Layout {
                d: offset_of!(BlockQ2K, d),
                m: offset_of!(BlockQ2K, dmin),
                scales: offset_of!(BlockQ2K, scales),
                qs: offset_of!(BlockQ2K, qs),
                ..z
            },
            Self::Q3K => Layout {
                d: offset_of!(BlockQ3K, d),
                scales: offset_of!(BlockQ3K, scales),
                qh: offset_of!(BlockQ3K, hmask),
                qs: offset_of!(BlockQ3K, qs),
                ..z
            },
            Self::Q4K => Layout {
                d: offset_of!(BlockQ4K, d),
                m: offset_of!(BlockQ4K, dmin),
                scales: offset_of!(BlockQ4K, scales),
                qs: offset_of!(BlockQ4K, qs),
                ..z
            },
            Self::Q5K => Layout {
                d: offset_of!(BlockQ5K, d),
                m: offset_of!(BlockQ5K, dmin),
                scales: offset_of!(BlockQ5K, scales),
                qh: offset_of!(BlockQ5K, qh),
                qs: offset_of!(BlockQ5K, qs),
                ..z
            },
            Self::Q6K => Layout {
                d: offset_of!(BlockQ6K, d),
                scales: offset_of!(BlockQ6K, scales),
                qh: offset_of!(BlockQ6K, qh),
                qs: offset_of!(BlockQ6K, ql),
                ..z
            },
            Self::Iq4Xs => Layout {
                d: offset_of!(BlockIq4Xs, d),
                scales_h: offset_of!(BlockIq4Xs, scales_h),
                scales: offset_of!(BlockIq4Xs, scales_l),
                qs: offset_of!(BlockIq4Xs, qs),
                ..z
            },
        }
    }

    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Kept on the device exactly as the file stores it and decoded inside the matmul
    /// kernels: every block type, and F16 / BF16 (only F32 is plain floats on the device).
    pub const fn stays_packed(self) -> bool {
        self.is_quantized() || matches!(self, Self::F16 | Self::Bf16)
    }

    /// Bytes of `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        n.is_multiple_of(be).then(|| n / be * self.block_bytes() as u64)
    }

    /// llama.cpp's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q2K => "q2_K",
            Self::Q3K => "q3_K",
            Self::Q4K => "q4_K",
            Self::Q5K => "q5_K",
            Self::Q6K => "q6_K",
            Self::Iq4Nl => "iq4_nl",
            Self::Iq4Xs => "iq4_xs",
        }
    }
}

/// ggml's name for a type id vidllm does not read (IQ1/IQ2/IQ3, ternary, FP4, ...), for
/// errors that name what a file holds.
pub fn unsupported_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        9 => "q8_1",
        15 => "q8_K",
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        21 => "iq3_s",
        22 => "iq2_s",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        40 => "nvfp4",
        41 => "q1_0",
        _ => return None,
    })
}

/// Call `$body` with `$B` bound to the block struct of a quantised `$ty`.
#[macro_export]
macro_rules! with_block {
    ($ty:expr, $B:ident => $body:expr, else $other:expr) => {{
        use $crate::ggml::*;
        match $ty {
            GgmlType::Q4_0 => {
                type $B = BlockQ4_0;
                $body
            }
            GgmlType::Q4_1 => {
                type $B = BlockQ4_1;
                $body
            }
            GgmlType::Q5_0 => {
                type $B = BlockQ5_0;
                $body
            }
            GgmlType::Q5_1 => {
                type $B = BlockQ5_1;
                $body
            }
            GgmlType::Q8_0 => {
                type $B = BlockQ8_0;
                $body
            }
            GgmlType::Iq4Nl => {
                type $B = BlockIq4Nl;
                $body
            }
            GgmlType::Q2K => {
                type $B = BlockQ2K;
                $body
            }
            GgmlType::Q3K => {
                type $B = BlockQ3K;
                $body
            }
            GgmlType::Q4K => {
                type $B = BlockQ4K;
                $body
            }
            GgmlType::Q5K => {
                type $B = BlockQ5K;
                $body
            }
            GgmlType::Q6K => {
                type $B = BlockQ6K;
                $body
            }
            GgmlType::Iq4Xs => {
                type $B = BlockIq4Xs;
                $body
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => $other,
        }
    }};
}

/// Dequantise one block (`bytes` = exactly one block) into `out` (its elements).
#[inline]
pub fn dequant_block(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    with_block!(ty, B => bytemuck::from_bytes::<B>(bytes).dequantize(out), else match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        GgmlType::F16 => out[0] = f16_of([bytes[0], bytes[1]]),
        _ => out[0] = bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
    })
}

/// Dequantise a whole row-major tensor of `n` elements.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let be = ty.block_elems();
    let bb = ty.block_bytes();
    let mut out = vec![0f32; n];
    for (blk, chunk) in out.chunks_mut(be).enumerate() {
        dequant_block(ty, &bytes[blk * bb..(blk + 1) * bb], chunk);
    }
    out
}

/// Quantise f32 values into GGML blocks (round-to-nearest, as ggml's reference quantisers).
/// Used for Hugging Face checkpoints quantised on load and for kernel tests.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    assert!(x.len().is_multiple_of(ty.block_elems()), "quantize: length not a multiple of the block");
    let mut out = Vec::with_capacity(ty.bytes_for(x.len() as u64).unwrap_or(0) as usize);
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::Bf16 => x.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            // Runs of blocks over the threads: a folder's matrices are quantised as they
            // load (`--quant`, `--vision-quant`), one at a time.
            const RUN: usize = 1024 * QK;
            let runs: Vec<Vec<u8>> = x
                .par_chunks(RUN)
                .map(|run| {
                    let mut bytes = Vec::with_capacity(ty.bytes_for(run.len() as u64).unwrap_or(0) as usize);
                    run.chunks(QK).for_each(|b| quantize_block(ty, b, &mut bytes));
                    bytes
                })
                .collect();
            runs.iter().for_each(|r| out.extend_from_slice(r));
        }
        other => panic!("quantize: vidllm quantises to q4_0, q4_1 and q8_0; {} comes from llama.cpp's quantizer", other.name()),
    }
    out
}

fn quantize_block(ty: GgmlType, b: &[f32], out: &mut Vec<u8>) {
    let f16_bytes = |v: f32| f16::from_f32(v).to_le_bytes();
    match ty {
        GgmlType::Q4_0 => {
            // The signed value of largest magnitude maps to -8.
            let max = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut blk = BlockQ4_0 { d: f16_bytes(d), qs: [0; QK / 2] };
            for (j, q) in blk.qs.iter_mut().enumerate() {
                let q0 = ((b[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                let q1 = ((b[j + QK / 2] * id + 8.5) as i32).clamp(0, 15) as u8;
                *q = q0 | (q1 << 4);
            }
            out.extend_from_slice(bytemuck::bytes_of(&blk));
        }
        GgmlType::Q4_1 => {
            // ggml's comparisons (`if (v < min) min = v`), which vectorise where `f32::min`'s
            // NaN rules do not.
            let min = b.iter().fold(f32::INFINITY, |m, &v| if v < m { v } else { m });
            let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut blk = BlockQ4_1 { d: f16_bytes(d), m: f16_bytes(min), qs: [0; QK / 2] };
            for (j, q) in blk.qs.iter_mut().enumerate() {
                let q0 = (((b[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                let q1 = (((b[j + QK / 2] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                *q = q0 | (q1 << 4);
            }
            out.extend_from_slice(bytemuck::bytes_of(&blk));
        }
        GgmlType::Q8_0 => {
            let amax = b.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut blk = BlockQ8_0 { d: f16_bytes(d), qs: [0; QK] };
            for (q, &v) in blk.qs.iter_mut().zip(b) {
                *q = round_half_away(v * id).clamp(-127.0, 127.0) as i8;
            }
            out.extend_from_slice(bytemuck::bytes_of(&blk));
        }
        _ => unreachable!("quantize() passes only q4_0, q4_1 and q8_0"),
    }
}

/// `x.round()` (`roundf`: halves away from zero) for `|x| < 2^31`, as a Q8_0 code's scaled
/// value is, without the library call `round` compiles to: the truncation and its exact
/// remainder. NaN gives NaN's code, 0, as `roundf` then the cast do.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let whole = x as i32 as f32;
    let rest = x - whole;
    if rest >= 0.5 {
        whole + 1.0
    } else if rest <= -0.5 {
        whole - 1.0
    } else {
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect()
    }

    #[test]
    fn roundtrip_error_is_within_half_a_step() {
        let x = ramp(64);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let q = quantize(ty, &x);
            assert_eq!(q.len(), 2 * ty.block_bytes());
            let y = dequantize(ty, &q, x.len());
            let range = 100.0 / 17.0;
            let step = match ty {
                GgmlType::Q8_0 => range / 127.0,
                _ => range / 7.0,
            };
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= step, "{ty:?}: max err {err} > step {step}");
        }
    }

    #[test]
    fn q4_1_block_layout_matches_ggml() {
        // d = 1, m = -8: nibble q decodes to q - 8; element j low nibble, j+16 high.
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
        blk.extend_from_slice(&f16::from_f32(-8.0).to_le_bytes());
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_1, &blk, 32);
        assert_eq!(y[3], 3.0 - 8.0);
        assert_eq!(y[16 + 3], 12.0 - 8.0);
    }

    /// [`round_half_away`] is `f32::round` on every value a Q8_0 code is taken from, and
    /// around every half.
    #[test]
    fn rounding_without_roundf() {
        for i in -(130 << 12)..(130 << 12) {
            let x = i as f32 / 4096.0;
            for x in [x, x.next_up(), x.next_down()] {
                assert_eq!(round_half_away(x), x.round(), "{x}");
            }
        }
        assert_eq!(round_half_away(0.499_999_97), 0.0);
        assert_eq!(round_half_away(-0.499_999_97), -0.0);
        assert_eq!(round_half_away(f32::NAN) as i8, f32::NAN.round() as i8);
    }

    /// Millions of values a second that [`quantize`] turns into blocks, per type (a folder's
    /// `--quant` and `--vision-quant` on load); run by hand:
    /// `cargo test --release -p vidllm-core --lib quantize_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn quantize_speed() {
        let x: Vec<f32> = (0..1 << 24).map(|i| ((i * 2_654_435_761usize) >> 11) as f32 / 1e6 - 1.0).collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let best = (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(quantize(ty, &x));
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            eprintln!("{}: {:.0} M values/s", ty.name(), x.len() as f64 / best / 1e6);
        }
    }
}
