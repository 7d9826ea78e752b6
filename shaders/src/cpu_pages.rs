//! The CPU backend's largest fresh buffers, and its weights, in transparent huge pages
//! where Linux has them.
//!
//! glibc's `malloc` maps every block over 32 MiB afresh and unmaps it when it is freed
//! (its largest `M_MMAP_THRESHOLD`), so each page of such a block faults in, zeroed by the
//! kernel, on its first write: 4 KiB at a time. A vision tower's MLP makes blocks of that
//! size every layer (8 SigLIP frames at 512 px: 100 MB of products for `fc1`, 50 MB of
//! their quantised codes for `fc2`), and the faults of one `ask` (930,000 of them for
//! SmolVLM2's bench model) took several seconds of kernel time. Advised as huge pages
//! (`MADV_HUGEPAGE`; honoured where `/sys/kernel/mm/transparent_hugepage/enabled` is
//! `madvise` or `always`), such a block faults in 2 MiB at a time. Smaller blocks come
//! from glibc's heap, reused without faults, and are left alone: advice there would split
//! the heap's mapping a little more on each call.

//! The weights are read whole by every decode step (SmolLM2-135M's Q8_0 file: 143 MB a
//! token), from many buffers of a few hundred KiB to a few MiB in glibc's heap, in 4 KiB
//! pages: a TLB miss and a page walk every 4 KiB, and the hardware prefetchers stop at each
//! page's end. [`settle_weights`] moves the 2 MiB blocks that the weight buffers loaded
//! since its last call fill (buffers side by side in the heap taken as one run) into huge
//! pages, once, after a model loads: `MADV_HUGEPAGE`, then `MADV_COLLAPSE` (Linux 6.1 on)
//! to copy them there at once rather than when `khugepaged` gets to them. On a 2-core
//! Zen 4 that made SmolLM2-135M's Q8_0 decode about 5% faster (README, "Speed"), for
//! about 30 ms at load.

use std::sync::Mutex;

/// The weight buffers noted since the last [`settle_weights`]: (address, bytes).
static NOTED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// Buffers this close to each other are settled as one run with what lies between (the
/// heap's chunk headers, and the small allocations a loader makes between matrices).
const SLACK: usize = 64 << 10;

/// Notes a buffer of weights for [`settle_weights`].
pub(crate) fn note_weights(bytes: &[u8]) {
    if !bytes.is_empty() {
        NOTED.lock().unwrap_or_else(|p| p.into_inner()).push((bytes.as_ptr() as usize, bytes.len()));
    }
}

/// The runs of 2 MiB blocks that the noted buffers fill, joined where they lie within
/// [`SLACK`] of each other: `(start, end)` addresses, 2 MiB aligned.
fn huge_runs(mut noted: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    const HUGE: usize = 2 << 20;
    noted.sort_unstable();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (at, len) in noted {
        match spans.last_mut() {
            Some((_, end)) if at <= end.saturating_add(SLACK) => *end = (*end).max(at + len),
            _ => spans.push((at, at + len)),
        }
    }
    spans.into_iter().map(|(s, e)| (s.next_multiple_of(HUGE), e / HUGE * HUGE)).filter(|(s, e)| e > s).collect()
}

/// Moves the weights noted since the last call into huge pages (see the module); returns
/// the bytes advised. Nothing happens off Linux, or with `VIDLLM_HUGE_PAGES=0`. The pages
/// keep their values: a kernel that refuses (no THP, no huge page free) leaves 4 KiB ones.
pub fn settle_weights() -> usize {
    let noted = std::mem::take(&mut *NOTED.lock().unwrap_or_else(|p| p.into_inner()));
    if std::env::var("VIDLLM_HUGE_PAGES").is_ok_and(|v| v == "0") {
        return 0;
    }
    let runs = huge_runs(noted);
    #[cfg(target_os = "linux")]
    for &(start, end) in &runs {
        /// `MADV_COLLAPSE` (Linux 6.1): the `libc` crate names it for glibc targets only.
        const MADV_COLLAPSE: libc::c_int = 25;
        // SAFETY: the runs lie within buffers noted as weights (and the heap between them);
        // if one was freed since, its memory is the heap's or unmapped. Either way the
        // advice changes how pages are backed, never what they hold, and an unmapped range
        // is refused. Errors (an older kernel, no THP) leave the pages as they were: the
        // results are ignored.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            libc::madvise(start as *mut libc::c_void, end - start, MADV_COLLAPSE);
        }
    }
    runs.iter().map(|(s, e)| e - s).sum()
}

/// Blocks at least this large are advised: glibc's largest mmap threshold, past which
/// every block is a mapping of its own.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const MIN_BYTES: usize = 32 << 20;

/// Advise the pages of `v`'s capacity as huge pages, before anything is written there.
/// The values do not change; nothing happens for small vectors or off Linux.
pub(crate) fn advise_huge<T>(v: &mut Vec<T>) {
    let bytes = v.capacity() * size_of::<T>();
    #[cfg(not(target_os = "linux"))]
    let _ = (v, bytes);
    #[cfg(target_os = "linux")]
    if bytes >= MIN_BYTES {
        const HUGE: usize = 2 << 20;
        let at = v.as_mut_ptr() as usize;
        let (start, end) = (at.next_multiple_of(HUGE), (at + bytes) / HUGE * HUGE);
        if end > start {
            // SAFETY: the range lies within the vector's allocation; the advice changes how
            // its pages are backed, not what they hold. A refusal (a kernel without THP)
            // leaves 4 KiB pages: the result is ignored.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(test)]
mod tests {
    /// Buffers side by side (within the slack) make one run, aligned inward to 2 MiB; a
    /// buffer far away makes its own, or none where it fills no whole block.
    #[test]
    fn runs_join_neighbours_and_keep_whole_blocks() {
        const M: usize = 1 << 20;
        let noted = vec![(100 * M + 3 * M, M), (100 * M + 16, 3 * M - 100), (100 * M + 4 * M + 4096, 5 * M), (300 * M + 1, M)];
        assert_eq!(super::huge_runs(noted), vec![(102 * M, 108 * M)]);
        assert_eq!(super::huge_runs(vec![(7 * M, 4 * M), (40 * M, 2 * M)]), vec![(8 * M, 10 * M), (40 * M, 42 * M)]);
        assert!(super::huge_runs(Vec::new()).is_empty());
    }

    /// Weights settled in huge pages keep their values.
    #[test]
    fn settled_weights_keep_their_values() {
        let w: Vec<u32> = (0..3u32 << 20).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        super::note_weights(bytemuck::cast_slice(&w));
        super::settle_weights();
        assert!(w.iter().enumerate().all(|(i, &x)| x == (i as u32).wrapping_mul(2_654_435_761)));
    }

    #[test]
    fn advice_keeps_the_values() {
        let mut v = vec![7u32; 40 << 18]; // 40 MiB
        super::advise_huge(&mut v);
        v.iter_mut().enumerate().step_by(4099).for_each(|(i, x)| *x += i as u32);
        assert!(v.iter().enumerate().all(|(i, &x)| x == if i % 4099 == 0 { 7 + i as u32 } else { 7 }));
        let mut fresh = Vec::<f32>::with_capacity(50 << 18);
        super::advise_huge(&mut fresh);
        fresh.extend((0..50 << 18).map(|i| i as f32));
        assert_eq!(fresh[12_345], 12_345.0);
    }
}
