//! PLLaVA's adaptive 3-D average pooling of frame tokens (`torch.nn.AdaptiveAvgPool3d`
//! over `(T, h, w)`), done as three small matrix products on the device.
//!
//! Output bin i on an axis averages inputs `[floor(i*in/out), ceil((i+1)*in/out))`; the 3-D
//! box mean is the product of the three 1-D means, so pooling is separable: one averaging
//! matrix per axis. Repeating frames before pooling (PLLaVA's `repeat_interleave` for short
//! clips, or an image repeated `num_frames` times) is a 0/1 matrix folded into the time one.

use burn::tensor::{Device, Tensor, TensorData};

/// `[n_out, n_in]` averaging matrix of 1-D adaptive average pooling, row-major.
pub fn adaptive_avg_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_out * n_in];
    for i in 0..n_out {
        let lo = i * n_in / n_out;
        let hi = ((i + 1) * n_in).div_ceil(n_out);
        for j in lo..hi {
            m[i * n_in + j] = 1.0 / (hi - lo) as f32;
        }
    }
    m
}

/// `[n_repeated, t]` 0/1 matrix of `repeat_interleave(n_repeated / t + 1)[:n_repeated]`.
pub fn repeat_matrix(t: usize, n_repeated: usize) -> Vec<f32> {
    let k = n_repeated / t + 1;
    let mut m = vec![0f32; n_repeated * t];
    for j in 0..n_repeated {
        m[j * t + (j / k).min(t - 1)] = 1.0;
    }
    m
}

fn matmul_host(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut c = vec![0f32; n * m];
    for i in 0..n {
        for l in 0..k {
            let av = a[i * k + l];
            if av != 0.0 {
                for j in 0..m {
                    c[i * m + j] += av * b[l * m + j];
                }
            }
        }
    }
    c
}

/// Adaptive average pooling of a frame-major token grid, with an optional frame
/// repetition (`repeat_to`) before pooling the time axis.
///
/// # Shapes
/// - x: `[t, h, w, d]` -> `[t_out * h_out * w_out, d]` (frame-major)
pub fn pool3d(x: Tensor<4>, out: [usize; 3], repeat_to: Option<usize>, device: &Device) -> Tensor<2> {
    let [t, h, w, d] = x.dims();
    let [to, ho, wo] = out;
    let mat = |v: Vec<f32>, r: usize, c: usize| Tensor::<2>::from_data(TensorData::new(v, [r, c]), device);
    let pt = match repeat_to {
        Some(n) if n != t => matmul_host(&adaptive_avg_matrix(n, to), &repeat_matrix(t, n), to, n, t),
        _ => adaptive_avg_matrix(t, to),
    };
    let pw = mat(adaptive_avg_matrix(w, wo), wo, w).unsqueeze::<3>(); // [1, wo, w]
    let ph = mat(adaptive_avg_matrix(h, ho), ho, h).unsqueeze::<3>(); // [1, ho, h]
    let pt = mat(pt, to, t); // [to, t]
    let x = pw.matmul(x.reshape([t * h, w, d])); // [t*h, wo, d]
    let x = ph.matmul(x.reshape([t, h, wo * d])); // [t, ho, wo*d]
    pt.matmul(x.reshape([t, ho * wo * d])).reshape([to * ho * wo, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_follow_floor_and_ceil() {
        // 10 -> 4: [0,3) [2,5) [5,8) [7,10)
        let m = adaptive_avg_matrix(10, 4);
        let row = |i: usize| (0..10).filter(|&j| m[i * 10 + j] > 0.0).collect::<Vec<_>>();
        assert_eq!(row(0), vec![0, 1, 2]);
        assert_eq!(row(1), vec![2, 3, 4]);
        assert_eq!(row(3), vec![7, 8, 9]);
    }

    #[test]
    fn repeat_interleave_then_truncate() {
        // 6 frames to 8: k = 2 -> 0 0 1 1 2 2 3 3
        let m = repeat_matrix(6, 8);
        let src: Vec<usize> = (0..8).map(|j| (0..6).find(|&i| m[j * 6 + i] == 1.0).unwrap()).collect();
        assert_eq!(src, vec![0, 0, 1, 1, 2, 2, 3, 3]);
    }
}
