//! The CPU backend's largest fresh buffers, in transparent huge pages where Linux has them.
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

/// Blocks at least this large are advised: glibc's largest mmap threshold, past which
/// every block is a mapping of its own.
const MIN_BYTES: usize = 32 << 20;

/// Advise the pages of `v`'s capacity as huge pages, before anything is written there.
/// The values do not change; nothing happens for small vectors or off Linux.
pub(crate) fn advise_huge<T>(v: &mut Vec<T>) {
    let bytes = v.capacity() * size_of::<T>();
    if bytes < MIN_BYTES {
        return;
    }
    #[cfg(target_os = "linux")]
    {
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
