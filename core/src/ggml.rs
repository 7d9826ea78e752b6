//! GGML tensor types and block layouts (the format the 4-bit weights keep on the device).
//!
//! Block layouts follow ggml's `ggml-common.h`: every quantised row is a run of
//! 32-element blocks; the scale (and min) are IEEE f16.
//! - Q4_0 (18 B): d f16, 16 B nibbles; x = (q - 8) * d
//! - Q4_1 (20 B): d f16, m f16, 16 B nibbles; x = q * d + m
//! - Q8_0 (34 B): d f16, 32 x i8; x = q * d
//!
//! Nibble j of byte `qs[j]` (low) is element j, the high nibble element j + 16.

use half::f16;

/// Elements per quantisation block (all supported quantised types).
pub const QK: usize = 32;

/// A GGML tensor element type that vidllm can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    /// Map the on-disk type id (`ggml_type`) to a supported type.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(Self::F32),
            1 => Some(Self::F16),
            2 => Some(Self::Q4_0),
            3 => Some(Self::Q4_1),
            8 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    /// Elements per block (1 for plain float types).
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        n.is_multiple_of(be).then(|| n / be * self.block_bytes() as u64)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q8_0 => "q8_0",
        }
    }
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Dequantise one block (`bytes` = exactly one block) into `out` (32 values).
pub fn dequant_block(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::Q4_0 => {
            let d = f16_at(bytes, 0);
            for j in 0..16 {
                let q = bytes[2 + j];
                out[j] = ((q & 0x0f) as f32 - 8.0) * d;
                out[j + 16] = ((q >> 4) as f32 - 8.0) * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(bytes, 0), f16_at(bytes, 2));
            for j in 0..16 {
                let q = bytes[4 + j];
                out[j] = (q & 0x0f) as f32 * d + m;
                out[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(bytes, 0);
            for j in 0..QK {
                out[j] = bytes[2 + j] as i8 as f32 * d;
            }
        }
        GgmlType::F32 => out[0] = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        GgmlType::F16 => out[0] = f16_at(bytes, 0),
    }
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
        _ => x.chunks(QK).for_each(|b| quantize_block(ty, b, &mut out)),
    }
    out
}

fn quantize_block(ty: GgmlType, b: &[f32], out: &mut Vec<u8>) {
    match ty {
        GgmlType::Q4_0 => {
            // The signed value of largest magnitude maps to -8.
            let max = b.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..16 {
                let q0 = ((b[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                let q1 = ((b[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                out.push(q0 | (q1 << 4));
            }
        }
        GgmlType::Q4_1 => {
            let min = b.iter().copied().fold(f32::INFINITY, f32::min);
            let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let q0 = (((b[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                let q1 = (((b[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.push(q0 | (q1 << 4));
            }
        }
        GgmlType::Q8_0 => {
            let amax = b.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for &v in b {
                out.push((v * id).round().clamp(-127.0, 127.0) as i8 as u8);
            }
        }
        GgmlType::F32 | GgmlType::F16 => unreachable!("plain float types have no blocks"),
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
}
