//! How far a loader has read a model file's tensors, for front ends to show (the native
//! CLI draws a progress bar from it). Loaders read each tensor through the file's reader
//! (`Gguf::tensor_bytes`, `Checkpoint`'s typed reads), which counts the bytes.

use std::sync::atomic::{AtomicU64, Ordering};

/// Called with (bytes of tensors read so far, bytes of all tensors) after each read.
pub type OnRead = Box<dyn Fn(u64, u64) + Send + Sync>;

/// Tensor bytes read out of a file's (or a folder's) total.
pub struct ReadProgress {
    done: AtomicU64,
    total: u64,
    on_read: Option<OnRead>,
}

impl ReadProgress {
    pub fn new(total: u64) -> Self {
        Self { done: AtomicU64::new(0), total, on_read: None }
    }

    /// Report every read to `f` from now on.
    pub fn observe(&mut self, f: OnRead) {
        self.on_read = Some(f);
    }

    /// `n` more bytes were read. A tensor read twice (a tied output head) counts twice,
    /// so the count is capped at the total.
    pub fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed).saturating_add(n).min(self.total);
        if let Some(f) = &self.on_read {
            f(done, self.total);
        }
    }
}
