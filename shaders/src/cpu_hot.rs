//! Workers kept awake across a decode step, inside rayon's own pool.
//!
//! A decode step is about 120 small products (SmolLM2-135M: 30 layers of four, tens of
//! microseconds each on two threads) with a few microseconds of serial work between them.
//! Handed to rayon one by one, each product wakes the sleeping worker (a futex and the
//! scheduler: on a VM about as long as a small product), and the worker's idle
//! `sched_yield` spinning takes 15-20% of a step. llama.cpp keeps its threads spinning
//! between operations. This does the same for the products, with rayon's workers, so
//! that no extra thread competes for a core:
//!
//! - [`for_each_chunk_mut`] publishes a job (a task count and a closure) and takes tasks
//!   itself. Tasks are claimed one at a time with a compare-and-swap on one word, (job
//!   number, task count, next task), so a worker that is descheduled holds up its own
//!   task and no other.
//! - The first job of a burst `rayon::spawn`s spinners, up to one per other worker. A
//!   spinner takes tasks while there are any, runs pending rayon work in between
//!   (`rayon::yield_now`, so the step's other parallel operations still get every
//!   thread), and goes back to rayon after [`IDLE`] without work: an idle process does
//!   not spin.
//! - One caller publishes at a time. A second caller, a caller outside the pool, or a
//!   one-thread pool takes rayon's ordinary path.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, TryLockError};
// std's clock panics in the browser (wasm32-unknown-unknown); web-time is std's natively and
// `performance.now()` there.
use web_time::{Duration, Instant};

use rayon::prelude::*;

/// How long a spinner waits for work before it goes back to rayon's pool (where waking
/// it costs a futex): longer than any gap within a decode step, short enough that an
/// idle process stops spinning at once to a person.
const IDLE: Duration = Duration::from_micros(500);

/// A published job: `f(task, chunk)` for each chunk of `data`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    /// Tasks finished, by anyone.
    done: AtomicUsize,
    /// A spinner's task panicked.
    panicked: AtomicBool,
}

/// The one job slot.
struct Hot {
    /// `job << 32 | tasks << 16 | next`: the current job's number, its task count and the
    /// next task to claim.
    claim: AtomicU64,
    /// The current job; valid while its tasks are not all done.
    job: AtomicPtr<Job<'static>>,
    /// Spinners spawned and not yet gone back.
    spinners: AtomicUsize,
    /// Held by the caller whose job is published.
    publisher: Mutex<()>,
}

static HOT: Hot =
    Hot { claim: AtomicU64::new(0), job: AtomicPtr::new(std::ptr::null_mut()), spinners: AtomicUsize::new(0), publisher: Mutex::new(()) };

/// Most tasks one job can have (the claim word's field).
const MAX_TASKS: usize = u16::MAX as usize;

/// `f(i, chunk)` for each `chunk`-sized piece `i` of `data` (the last may be shorter),
/// split over the pool's threads as `data.par_chunks_mut(chunk)` would be, on hot
/// workers where this thread is one of the pool's.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let tasks = data.len().div_ceil(chunk.max(1));
    let eligible = tasks > 1 && tasks <= MAX_TASKS && rayon::current_num_threads() > 1 && rayon::current_thread_index().is_some();
    let guard = match eligible.then(|| HOT.publisher.try_lock()) {
        Some(Ok(guard)) => Some(guard),
        // A task that panicked on the publisher's thread left the slot in order (see `run`).
        Some(Err(TryLockError::Poisoned(p))) => Some(p.into_inner()),
        Some(Err(TryLockError::WouldBlock)) | None => None,
    };
    let Some(_guard) = guard else {
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    };
    let (len, base) = (data.len(), SendPtr(data.as_mut_ptr()));
    let task = |i: usize| {
        let start = i * chunk;
        // SAFETY: each task index is claimed once, so the chunks are disjoint pieces of
        // `data`, which outlives the job.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), chunk.min(len - start)) };
        f(i, piece)
    };
    run(tasks, &task);
}

/// A pointer the tasks share; each derives a disjoint piece from it.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: the pieces made from it are disjoint, and `T: Send`.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Publishes `f` over `tasks` tasks, takes tasks until none is left, and waits for the
/// ones spinners took. The caller holds the publisher lock.
fn run(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let job = Job { f, done: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
    // SAFETY (of the lifetime): the job is dereferenced only by whoever claimed one of
    // its tasks, and this function returns only once every task is done.
    HOT.job.store(&job as *const Job as *mut Job<'static>, Ordering::Release);
    let number = (HOT.claim.load(Ordering::Relaxed) >> 32).wrapping_add(1) & 0xffff_ffff;
    HOT.claim.store(number << 32 | (tasks as u64) << 16, Ordering::Release);
    wake_spinners();
    // A panic here waits for the spinners' tasks before it unwinds past the job.
    let (mut mine, mut failure) = (0, None);
    while let Some(i) = claim() {
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            failure.get_or_insert(e);
        }
        mine += 1;
    }
    job.done.fetch_add(mine, Ordering::AcqRel);
    let mut waited = 0u32;
    while job.done.load(Ordering::Acquire) < tasks {
        waited += 1;
        // A spinner descheduled mid-task: let it have the core.
        if waited.is_multiple_of(1024) { std::thread::yield_now() } else { std::hint::spin_loop() }
    }
    if let Some(e) = failure {
        resume_unwind(e);
    }
    assert!(!job.panicked.load(Ordering::Acquire), "a product's task panicked on a pool worker");
}

/// The next task of the published job, claimed; `None` when none is left.
fn claim() -> Option<usize> {
    let mut word = HOT.claim.load(Ordering::Acquire);
    loop {
        let (tasks, next) = ((word >> 16) & 0xffff, word & 0xffff);
        if next >= tasks {
            return None;
        }
        match HOT.claim.compare_exchange_weak(word, word + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(next as usize),
            Err(now) => word = now,
        }
    }
}

/// Spawns spinners until there is one per other worker of the pool.
fn wake_spinners() {
    let want = rayon::current_num_threads() - 1;
    let publisher = rayon::current_thread_index();
    let mut have = HOT.spinners.load(Ordering::Acquire);
    while have < want {
        match HOT.spinners.compare_exchange_weak(have, have + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                rayon::spawn(move || spin(publisher));
                have += 1;
            }
            Err(now) => have = now,
        }
    }
}

/// A spinner: takes the published jobs' tasks and rayon's pending work until [`IDLE`]
/// passes without either.
fn spin(publisher: Option<usize>) {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            HOT.spinners.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _leave = Leave;
    // Picked up by the publisher itself (in a join of its own): it has its work to do.
    if rayon::current_thread_index() == publisher {
        return;
    }
    let mut last = Instant::now();
    let mut idle = 0u32;
    loop {
        if let Some(i) = claim() {
            // SAFETY: a claimed task keeps its job alive until this task is counted done;
            // the job was stored before the claim word that was claimed.
            let job = unsafe { &*HOT.job.load(Ordering::Acquire) };
            if catch_unwind(AssertUnwindSafe(|| (job.f)(i))).is_err() {
                job.panicked.store(true, Ordering::Release);
            }
            job.done.fetch_add(1, Ordering::AcqRel);
            last = Instant::now();
            continue;
        }
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            last = Instant::now();
            continue;
        }
        std::hint::spin_loop();
        // The clock every 64 idle turns: in the browser each reading is a call into JS.
        idle = idle.wrapping_add(1);
        if idle.is_multiple_of(64) && last.elapsed() > IDLE {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk is visited once with its own index, on hot workers (from inside a
    /// pool of several threads), on rayon's path (outside it), and with jobs in quick
    /// succession and nested.
    #[test]
    fn every_chunk_once() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let check = || {
            for (len, chunk) in [(1000, 7), (64, 64), (65, 64), (5, 1), (0, 4)] {
                let mut v = vec![0usize; len];
                for_each_chunk_mut(&mut v, chunk, |i, c| c.iter_mut().for_each(|x| *x += i + 1));
                assert!(v.iter().enumerate().all(|(j, &x)| x == j / chunk + 1), "len {len} chunk {chunk}");
            }
            // Nested: the inner call takes rayon's path.
            let mut outer = vec![0u32; 8];
            for_each_chunk_mut(&mut outer, 2, |_, c| {
                let mut inner = vec![0u32; 16];
                for_each_chunk_mut(&mut inner, 3, |_, d| d.iter_mut().for_each(|x| *x = 1));
                c.iter_mut().for_each(|x| *x = inner.iter().sum());
            });
            assert!(outer.iter().all(|&x| x == 16));
        };
        pool.install(|| (0..200).for_each(|_| check()));
        check();
    }
}
