//! Splitting a call's work over rayon's pool with the calling thread taking part.
//!
//! Engine ranks call kernels from their own threads, outside the pool. Handing a
//! whole call to the pool (`par_iter` from such a thread) puts the caller to sleep
//! until the pool is done and it has to be woken again, which cost ~60 µs per call
//! on the virtual machines measured: as much as a 2 MB weight takes to stream, and
//! more than a decode step's attention of one layer. Here the caller works instead
//! of waiting, and a helper that starts late only loses the chunks the caller has
//! already taken. A helper that has finished stays awake for the next call a while
//! ([`LINGER`]), unless several threads share the pool.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Runs `f(0..chunks)`, each index once, on the calling thread and up to
/// `rayon::current_num_threads() - 1` helpers of the pool; returns when all are done.
/// A panic in `f` reaches the caller (after every claimed chunk is done), wherever it
/// happened: a pool thread that panicked would abort the process.
pub fn for_each_index(chunks: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if chunks <= 1 || threads <= 1 {
        (0..chunks).for_each(f);
        return;
    }
    let _caller = Caller::enter();
    let f: &(dyn Fn(usize) + Sync) = &f;
    let fork = Arc::new(Fork {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        chunks,
        panic: Mutex::new(None),
        // SAFETY: lifetime erasure only; see `Fork`.
        f: unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync), *const (dyn Fn(usize) + Sync + 'static)>(f) },
    });
    for _ in 0..(threads - 1).min(chunks - 1) {
        if HOT.claim() {
            HOT.offer(fork.clone());
        } else {
            let fork = fork.clone();
            rayon::spawn(move || {
                fork.work();
                if !HOT.shared.load(Ordering::Relaxed) {
                    HOT.linger();
                }
            });
        }
    }
    fork.work();
    // The helpers are finishing their last chunks: spin briefly, then give the core
    // to them.
    let mut spins = 0u32;
    while fork.done.load(Ordering::Acquire) < chunks {
        if spins < 64 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
    let panic = fork.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = panic {
        resume_unwind(p);
    }
}

/// How long a helper that finished its part of a call keeps watching for the next
/// call before it goes back to rayon (and, with nothing to do, to sleep). A decode
/// step is a chain of calls a few µs to a few ms apart; a sleeping helper took ~40 µs
/// to wake (the virtual CPU halts when idle), and the caller streamed alone meanwhile:
/// 7% of a 229M model's f32 decode step, 15% in bf16 (the model sweep with 50 µs
/// sleeps between its matmuls).
const LINGER: std::time::Duration = std::time::Duration::from_micros(300);

/// Helpers lingering after a call, and the calls offered to them.
struct Hot {
    /// Lingering helpers not yet claimed by an offer.
    free: AtomicUsize,
    offers: Mutex<std::collections::VecDeque<Arc<Fork>>>,
    /// Calls in progress from threads outside any call's chunks.
    callers: AtomicUsize,
    /// Set for good once two such calls overlapped: several threads (tensor-parallel
    /// ranks in one process) share the pool, and a spinning helper would hold a core
    /// another rank is waiting for (an in-process tp 2 step measured 5% slower).
    shared: std::sync::atomic::AtomicBool,
}

static HOT: Hot = Hot::new();

thread_local! {
    /// Whether this thread is running a call's chunk (a call made there is nested).
    static IN_CHUNK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts a top-level call in [`Hot::callers`] while it lasts.
struct Caller(bool);

impl Caller {
    fn enter() -> Caller {
        let top = !IN_CHUNK.get();
        if top && HOT.callers.fetch_add(1, Ordering::AcqRel) > 0 {
            HOT.shared.store(true, Ordering::Relaxed);
        }
        Caller(top)
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        if self.0 {
            HOT.callers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Hot {
    const fn new() -> Hot {
        Hot {
            free: AtomicUsize::new(0),
            offers: Mutex::new(std::collections::VecDeque::new()),
            callers: AtomicUsize::new(0),
            shared: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes one lingering helper for an offer the caller then makes.
    fn claim(&self) -> bool {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    fn offer(&self, fork: Arc<Fork>) {
        self.offers.lock().unwrap_or_else(|e| e.into_inner()).push_back(fork);
    }

    /// Runs offered calls until none comes for [`LINGER`]. A helper leaves only while
    /// no offer has claimed it, so every claim is answered; an offer answered late
    /// finds its chunks taken (the caller works through them) and returns at once.
    fn linger(&self) {
        self.free.fetch_add(1, Ordering::AcqRel);
        let mut since = std::time::Instant::now();
        let mut spins = 0u32;
        loop {
            let next = self.offers.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
            if let Some(fork) = next {
                fork.work();
                self.free.fetch_add(1, Ordering::AcqRel);
                since = std::time::Instant::now();
                continue;
            }
            spins += 1;
            // Other threads (another rank's, rayon's) may want this core. No `pause`
            // in the loop: a virtual machine's pause-loop exiting would hand the core
            // to the hypervisor.
            if spins.is_multiple_of(256) {
                if since.elapsed() > LINGER && self.claim() {
                    return;
                }
                std::thread::yield_now();
            }
        }
    }
}

/// `f(range)` over ranges that together cover `0..len` once, claimed by the calling
/// thread and the helpers as [`for_each_index`], each claim a share of what is left
/// (a `1 / (2·threads)` part, never under `min`): large pieces while there is much
/// to do, single units at the end, so the threads finish within one unit of each
/// other instead of one fixed-size chunk.
pub fn for_each_guided(len: usize, min: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let next = AtomicUsize::new(0);
    let claim = || {
        let mut cur = next.load(Ordering::Relaxed);
        loop {
            if cur >= len {
                return None;
            }
            let take = ((len - cur) / (2 * threads)).max(min.max(1)).min(len - cur);
            match next.compare_exchange_weak(cur, cur + take, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(cur..cur + take),
                Err(now) => cur = now,
            }
        }
    };
    for_each_index(threads.min(len), |_| {
        while let Some(r) = claim() {
            f(r)
        }
    });
}

/// `f(i, chunk)` for each `chunk`-long piece of `out` (the last may be shorter), in
/// parallel as [`for_each_index`].
pub fn for_each_chunk_mut<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    assert!(chunk > 0, "chunks of zero elements");
    let len = out.len();
    let base = SendPtr(out.as_mut_ptr());
    for_each_index(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: each index is run once, so the pieces handed out are disjoint and
        // inside `out`, which outlives the call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, piece)
    });
}

/// A pointer that tasks share to write disjoint parts of one buffer.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used to hand out disjoint parts of a buffer whose elements are `Send`.
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// The chunks of one call, claimed one at a time by the caller and the helpers.
struct Fork {
    next: AtomicUsize,
    done: AtomicUsize,
    chunks: usize,
    /// The first panic of a chunk, for the caller to resume.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    f: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: `f` is only called for a claimed chunk, and `for_each_index` keeps it
// alive until every claimed chunk is done; the rest is atomics.
unsafe impl Send for Fork {}
// SAFETY: as above.
unsafe impl Sync for Fork {}

impl Fork {
    /// Claims and runs chunks until none is left.
    fn work(&self) {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            let outer = IN_CHUNK.replace(true);
            // SAFETY: the chunk is claimed and not yet counted done, so the caller
            // is still waiting and `f` is alive.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*self.f)(c) }));
            IN_CHUNK.set(outer);
            if let Err(p) = result {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once() {
        for (len, chunk) in [(0, 3), (1, 1), (10, 3), (1000, 7), (64, 64)] {
            let mut v = vec![0usize; len];
            for_each_chunk_mut(&mut v, chunk, |i, piece| {
                for (j, x) in piece.iter_mut().enumerate() {
                    *x += i * chunk + j + 1;
                }
            });
            assert!(
                v.iter().enumerate().all(|(j, &x)| x == j + 1),
                "len {len} chunk {chunk}"
            );
        }
    }

    #[test]
    fn guided_ranges_cover_everything_once_and_shrink() {
        for (len, min) in [(0, 1), (1, 1), (7, 1), (224, 1), (1000, 3), (5, 10)] {
            let seen: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
            let sizes = Mutex::new(Vec::new());
            for_each_guided(len, min, |r| {
                sizes.lock().unwrap().push((r.start, r.len()));
                r.for_each(|i| {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                })
            });
            assert!(
                seen.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "len {len} min {min}"
            );
            let mut sizes = sizes.into_inner().unwrap();
            sizes.sort();
            // Claims shrink as the work runs out, and only the last is under `min`.
            let last = sizes.len().saturating_sub(1);
            for w in sizes.windows(2) {
                assert!(w[1].1 <= w[0].1 && w[0].1 >= min, "len {len} min {min}: {sizes:?}");
            }
            if len >= 224 {
                assert!(sizes[0].1 > 1 && sizes[last].1 <= min, "len {len} min {min}: {sizes:?}");
            }
        }
    }

    #[test]
    fn a_panic_in_any_chunk_reaches_the_caller() {
        for bad in [0, 57, 99] {
            let ran = AtomicUsize::new(0);
            let r = catch_unwind(AssertUnwindSafe(|| {
                for_each_index(100, |i| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    assert_ne!(i, bad, "chunk {bad} fails");
                })
            }));
            let msg = r.expect_err("the panic is resumed");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains(&format!("chunk {bad} fails")), "{msg}");
            assert_eq!(ran.into_inner(), 100, "the other chunks still ran");
        }
    }

    #[test]
    fn a_lingering_helper_takes_offers_then_leaves() {
        static HOT: Hot = Hot::new();
        static RAN: AtomicUsize = AtomicUsize::new(0);
        assert!(!HOT.claim(), "no helper lingers yet");
        let spawn = || std::thread::spawn(|| HOT.linger());
        let mut helper = spawn();
        for round in 1..=3 {
            // A claim that succeeds holds the helper until it has run an offer. On a
            // loaded machine this thread may be away longer than LINGER between
            // rounds, and then the helper has left: another one takes its place.
            while !HOT.claim() {
                if helper.is_finished() {
                    helper.join().unwrap();
                    helper = spawn();
                }
                std::hint::spin_loop();
            }
            let f: &'static (dyn Fn(usize) + Sync) = &|_| {
                RAN.fetch_add(1, Ordering::Relaxed);
            };
            let fork = Arc::new(Fork {
                next: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                chunks: 10,
                panic: Mutex::new(None),
                f,
            });
            HOT.offer(fork.clone());
            // Only the helper works on this call.
            while fork.done.load(Ordering::Acquire) < 10 {
                std::hint::spin_loop();
            }
            assert_eq!(RAN.load(Ordering::Relaxed), 10 * round);
        }
        // With no more offers it leaves after LINGER, unclaimed.
        helper.join().unwrap();
        assert_eq!(HOT.free.load(Ordering::Acquire), 0);
    }

    #[test]
    fn works_from_inside_the_pool_too() {
        let total = AtomicUsize::new(0);
        rayon::scope(|_| {
            for_each_index(100, |i| {
                total.fetch_add(i, Ordering::Relaxed);
            })
        });
        assert_eq!(total.into_inner(), 4950);
    }
}
