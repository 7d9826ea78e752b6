//! CubeCL kernels for [`QuantOps`] on the cube backend (wgpu natively, WebGPU in the
//! browser; compiled to WGSL, no f16 shader feature needed).
//!
//! Weights are read as little-endian u32 words; a block's bytes need not be word-aligned
//! (Q4_0 blocks are 18 bytes), so reads go through `byte_at` / `word_at`. f16 scales are
//! decoded with integer arithmetic for the same reason.
//!
//! - `gemv`: one cube computes `ROWS` outputs; its 32 lanes per output stride over the
//!   row's blocks and meet in a shared-memory tree sum. Grid `(ceil(n/ROWS), m)`.
//! - `tiled`: 32x32 output tile per cube of 16x16 units, each unit 2x2 outputs; one quant
//!   block (32 k) of `x` and of dequantised `W` staged in shared memory per step.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::block::ty_from_id;
use crate::{GEMV_MAX_M, QuantOps};

const TYPE_Q4_0: u32 = 2;
const TYPE_Q4_1: u32 = 3;
const TYPE_Q8_0: u32 = 8;

/// Outputs per GEMV cube (one per `UNIT_POS_Y`).
const ROWS: u32 = 4;
/// Lanes per output in the GEMV.
const LANES: u32 = 32;
/// Output tile edge of the tiled kernel, and its k step (one block).
const TILE: u32 = 32;
/// Padded shared-memory row, against bank conflicts.
const TS: u32 = TILE + 1;

impl QuantOps for CubeBackend {
    fn q_matmul(x: CubeTensor, words: CubeTensor, ty: u32, n: usize, k: usize) -> CubeTensor {
        let gt = ty_from_id(ty);
        let x = into_contiguous(x);
        let m = x.meta.shape().num_elements() / k;
        let out = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([m, n]), DType::F32);
        let (bb, nb) = (gt.block_bytes() as u32, (k / 32) as u32);
        let client = x.client.clone();
        if m <= GEMV_MAX_M {
            let count = CubeCount::Static((n as u32).div_ceil(ROWS), m as u32, 1);
            gemv::launch(
                &client,
                count,
                CubeDim::new_2d(LANES, ROWS),
                words.into_buffer_arg(),
                x.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                n as u32,
                nb,
                bb,
                ty,
            );
        } else {
            let count = CubeCount::Static((n as u32).div_ceil(TILE), (m as u32).div_ceil(TILE), 1);
            tiled::launch(
                &client,
                count,
                CubeDim::new_2d(16, 16),
                words.into_buffer_arg(),
                x.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                m as u32,
                n as u32,
                nb,
                bb,
                ty,
            );
        }
        out
    }
}

/// Byte `off` of the word buffer.
#[cube]
fn byte_at(w: &[u32], off: u32) -> u32 {
    (w[(off >> 2) as usize] >> ((off & 3) * 8)) & 0xff
}

/// Four bytes starting at any byte offset (the buffer carries a spare word at the end).
#[cube]
fn word_at(w: &[u32], off: u32) -> u32 {
    let i = (off >> 2) as usize;
    let s = (off & 3) * 8;
    let mut v = w[i];
    if s != 0 {
        v = (v >> s) | (w[i + 1] << (32 - s));
    }
    v
}

/// IEEE half at an even byte offset, widened to f32.
#[cube]
fn f16_at(w: &[u32], off: u32) -> f32 {
    let h = (w[(off >> 2) as usize] >> ((off & 2) * 8)) & 0xffff;
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let mant = h & 0x3ff;
    let mut out = f32::reinterpret(sign | ((exp + 112) << 23) | (mant << 13));
    if exp == 0 {
        // Zero or subnormal: mant * 2^-24.
        let mag = f32::cast_from(mant) * 5.960_464_5e-8;
        out = f32::reinterpret(sign | u32::reinterpret(mag));
    } else if exp == 31 {
        out = f32::reinterpret(sign | 0x7f80_0000 | (mant << 13));
    }
    out
}

/// Scale, min (Q4_1; 0 otherwise) and first quant byte offset of the block at `base`.
#[cube]
fn block_header(w: &[u32], base: u32, #[comptime] ty: u32) -> (f32, f32, u32) {
    let d = f16_at(w, base);
    let mut mn = 0.0f32;
    let mut qs = base + 2;
    if comptime![ty == TYPE_Q4_1] {
        mn = f16_at(w, base + 2);
        qs = base + 4;
    }
    (d, mn, qs)
}

/// Element `j` (0..32) of the block at `base`, dequantised.
#[cube]
fn dequant(w: &[u32], base: u32, j: u32, #[comptime] ty: u32) -> f32 {
    let (d, mn, qs) = block_header(w, base, ty);
    if comptime![ty == TYPE_Q8_0] {
        let b = byte_at(w, qs + j);
        f32::cast_from(i32::cast_from(b) - i32::cast_from((b >> 7) * 256)) * d
    } else {
        let b = byte_at(w, qs + (j & 15));
        let q = f32::cast_from(select(j < 16, b & 15, b >> 4));
        // Q4_0: (q - 8) d (mn is 0); Q4_1: q d + m.
        let offset = comptime![if ty == TYPE_Q4_0 { 8.0f32 } else { 0.0f32 }];
        (q - offset) * d + mn
    }
}

/// Dot product of one weight block with 32 values of `x` starting at `xo`.
#[cube]
fn block_dot(w: &[u32], base: u32, x: &[f32], xo: u32, #[comptime] ty: u32) -> f32 {
    let (d, mn, qs) = block_header(w, base, ty);
    let mut acc = 0.0f32;
    let mut xsum = 0.0f32;
    if comptime![ty == TYPE_Q8_0] {
        for i in 0..8u32 {
            let word = word_at(w, qs + i * 4);
            for b in 0..4u32 {
                let q = (word >> (b * 8)) & 0xff;
                let qv = i32::cast_from(q) - i32::cast_from((q >> 7) * 256);
                acc += f32::cast_from(qv) * x[(xo + i * 4 + b) as usize];
            }
        }
    } else {
        for i in 0..4u32 {
            let word = word_at(w, qs + i * 4);
            for b in 0..4u32 {
                let byte = (word >> (b * 8)) & 0xff;
                let xl = x[(xo + i * 4 + b) as usize];
                let xh = x[(xo + 16 + i * 4 + b) as usize];
                acc += f32::cast_from(byte & 15) * xl + f32::cast_from(byte >> 4) * xh;
                xsum += xl + xh;
            }
        }
    }
    // Q4_0: (q - 8) d; Q4_1: q d + m; Q8_0: q d.
    let mut r = acc * d;
    if comptime![ty == TYPE_Q4_0] {
        r = (acc - 8.0 * xsum) * d;
    } else if comptime![ty == TYPE_Q4_1] {
        r = acc * d + mn * xsum;
    }
    r
}

// Written as a load, an add and a store: the form the kernel code was checked in on every device.
#[allow(clippy::assign_op_pattern)]
#[cube]
fn tree_step(sums: &mut [f32], slot: u32, lane: u32, #[comptime] stride: u32) {
    if lane < stride {
        sums[slot as usize] = sums[slot as usize] + sums[(slot + stride) as usize];
    }
    sync_cube();
}

#[cube(launch)]
fn gemv(w: &[u32], x: &[f32], out: &mut [f32], n: u32, nb: u32, bb: u32, #[comptime] ty: u32) {
    let lane = UNIT_POS_X;
    let row = CUBE_POS_X * ROWS + UNIT_POS_Y;
    let mrow = CUBE_POS_Y;
    let k = nb * 32;
    let mut partial = 0.0f32;
    if row < n {
        let row_base = row * nb * bb;
        let mut b = lane;
        while b < nb {
            partial += block_dot(w, row_base + b * bb, x, mrow * k + b * 32, ty);
            b += LANES;
        }
    }
    let mut sums = Shared::<[f32]>::new_slice(comptime![(LANES * ROWS) as usize]);
    let slot = UNIT_POS_Y * LANES + lane;
    sums[slot as usize] = partial;
    sync_cube();
    // Tree sum over the 32 lanes of this output.
    tree_step(&mut sums, slot, lane, 16u32);
    tree_step(&mut sums, slot, lane, 8u32);
    tree_step(&mut sums, slot, lane, 4u32);
    tree_step(&mut sums, slot, lane, 2u32);
    tree_step(&mut sums, slot, lane, 1u32);
    if lane == 0 && row < n {
        out[(mrow * n + row) as usize] = sums[slot as usize];
    }
}

#[cube(launch)]
fn tiled(w: &[u32], x: &[f32], out: &mut [f32], m: u32, n: u32, nb: u32, bb: u32, #[comptime] ty: u32) {
    let tx = UNIT_POS_X;
    let ty_ = UNIT_POS_Y;
    let tid = ty_ * 16 + tx;
    let n0 = CUBE_POS_X * TILE;
    let m0 = CUBE_POS_Y * TILE;
    let k = nb * 32;
    let mut xs = Shared::<[f32]>::new_slice(comptime![(TILE * TS) as usize]);
    let mut ws = Shared::<[f32]>::new_slice(comptime![(TILE * TS) as usize]);
    let mut a00 = 0.0f32;
    let mut a01 = 0.0f32;
    let mut a10 = 0.0f32;
    let mut a11 = 0.0f32;
    for kb in 0..nb {
        // Stage 32x32 of x and 32 rows x 32 k of dequantised W: 4 values per unit each.
        for r in 0..4u32 {
            let idx = tid + r * 256;
            let rr = idx / TILE;
            let cc = idx % TILE;
            let mut xv = 0.0f32;
            if m0 + rr < m {
                xv = x[((m0 + rr) * k + kb * 32 + cc) as usize];
            }
            xs[(rr * TS + cc) as usize] = xv;
            let mut wv = 0.0f32;
            if n0 + rr < n {
                wv = dequant(w, (n0 + rr) * nb * bb + kb * bb, cc, ty);
            }
            ws[(rr * TS + cc) as usize] = wv;
        }
        sync_cube();
        for kk in 0..TILE {
            let x0 = xs[(ty_ * TS + kk) as usize];
            let x1 = xs[((ty_ + 16) * TS + kk) as usize];
            let w0 = ws[(tx * TS + kk) as usize];
            let w1 = ws[((tx + 16) * TS + kk) as usize];
            a00 += x0 * w0;
            a01 += x0 * w1;
            a10 += x1 * w0;
            a11 += x1 * w1;
        }
        sync_cube();
    }
    let (r0, r1, c0, c1) = (m0 + ty_, m0 + ty_ + 16, n0 + tx, n0 + tx + 16);
    if r0 < m && c0 < n {
        out[(r0 * n + c0) as usize] = a00;
    }
    if r0 < m && c1 < n {
        out[(r0 * n + c1) as usize] = a01;
    }
    if r1 < m && c0 < n {
        out[(r1 * n + c0) as usize] = a10;
    }
    if r1 < m && c1 < n {
        out[(r1 * n + c1) as usize] = a11;
    }
}
