//! The compute team: the threads a forward's parallel regions (matrix products, attention)
//! run on.
//!
//! A SmolLM2-135M token has ~150 parallel regions of ~50 µs each. Between two regions the
//! forward's calling thread does a few microseconds of serial work (norms, RoPE, quantizing
//! activations); rayon's idle workers yield and then sleep in that gap and have to be woken
//! by a system call for the next region (at two threads, 8% of the wall time went idle and
//! 6% to the kernel). Here, the helpers spin between the regions of a forward — never more
//! spinning helpers than the cores the process may use, minus the caller — and park on a
//! condition variable outside forwards.
//!
//! One forward holds the team at a time; a forward started on another thread meanwhile (a
//! second session) waits for it, so no more threads compute than the process has cores.
//! Which thread computes a column or a head never changes its value.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// One parallel region: its items, cut into one contiguous range per thread. A thread
/// claims the items of its own range in order, then helps with the others' ranges, one
/// item at a time. (Contiguous ranges keep each thread's weight stream sequential, which
/// the hardware prefetcher needs in a memory-bound decode step; claiming items round
/// robin cost 4% of a step.)
struct Job {
    /// The region's body; valid while `done < n` (its caller waits for that).
    f: *const (dyn Fn(usize) + Sync),
    /// Per range: the next unclaimed item, and the range's end.
    ranges: Vec<(AtomicUsize, usize)>,
    done: AtomicUsize,
    panicked: AtomicBool,
}

// SAFETY: `f` points to a `Sync` closure, called only for claimed items while the region's
// caller is still waiting for them (see `Job::run`).
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    fn new(f: *const (dyn Fn(usize) + Sync), n: usize, threads: usize) -> Job {
        let parts = threads.clamp(1, n.max(1));
        Job {
            f,
            ranges: (0..parts)
                .map(|p| (AtomicUsize::new(p * n / parts), (p + 1) * n / parts))
                .collect(),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        }
    }

    /// Claims and runs items, from range `me` first, until none is left.
    fn run(&self, me: usize) {
        let parts = self.ranges.len();
        for k in 0..parts {
            let (next, end) = &self.ranges[(me + k) % parts];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= *end {
                    break;
                }
                // SAFETY: item `i` is claimed and not yet counted in `done`, so the caller
                // of `for_each` is still waiting and the closure is alive.
                let f = unsafe { &*self.f };
                if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
                self.done.fetch_add(1, Ordering::Release);
            }
        }
    }
}

struct Team {
    /// Threads of a region: the caller and its helpers.
    threads: usize,
    /// Taken by the forward that holds the team.
    lock: Mutex<()>,
    /// A forward holds the team (what the helpers spin on).
    held: AtomicBool,
    /// Bumped for each new region.
    generation: AtomicU64,
    /// The current region.
    job: Mutex<Option<Arc<Job>>>,
    /// Helpers park here outside forwards.
    park: Mutex<()>,
    wake: Condvar,
}

thread_local! {
    /// This thread holds the team (it is running a forward with it).
    static HOLDS: Cell<bool> = const { Cell::new(false) };
    /// Regions of this thread run on it alone (tests, and callers that ask).
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let threads = crate::compute_threads().max(1);
        let team: &'static Team = Box::leak(Box::new(Team {
            threads,
            lock: Mutex::new(()),
            held: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for h in 1..threads {
            std::thread::Builder::new()
                .name(format!("tandem-compute-{h}"))
                .spawn(move || helper(team, h))
                .expect("spawning a compute thread");
        }
        team
    })
}

/// A helper's life: run each new region's items; between regions spin while a forward
/// holds the team, park when none does.
fn helper(team: &'static Team, me: usize) {
    let mut seen = team.generation.load(Ordering::Acquire);
    loop {
        let g = team.generation.load(Ordering::Acquire);
        if g != seen {
            seen = g;
            let job = team.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(job) = job {
                job.run(me);
            }
            continue;
        }
        if team.held.load(Ordering::Acquire) {
            std::hint::spin_loop();
            continue;
        }
        let mut guard = team.park.lock().unwrap_or_else(|e| e.into_inner());
        while !team.held.load(Ordering::Acquire) && team.generation.load(Ordering::Acquire) == seen
        {
            guard = team.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Releases the team when a forward ends, also by unwinding.
struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        HOLDS.with(|h| h.set(false));
        team().held.store(false, Ordering::Release);
    }
}

/// Runs one forward with the team: its regions ([`for_each`]) use every compute thread,
/// and the helpers spin between them. Waits while another thread's forward holds the team;
/// when this thread already holds it (a nested forward) or runs alone, `f` runs as it is.
pub(crate) fn forward<R>(f: impl FnOnce() -> R) -> R {
    let t = team();
    if t.threads == 1 || HOLDS.with(Cell::get) || ALONE.with(Cell::get) {
        return f();
    }
    let _lock = t.lock.lock().unwrap_or_else(|e| e.into_inner());
    t.held.store(true, Ordering::Release);
    HOLDS.with(|h| h.set(true));
    let _held = Held;
    {
        let _g = t.park.lock().unwrap_or_else(|e| e.into_inner());
        t.wake.notify_all();
    }
    f()
}

/// Runs `f(0) .. f(n - 1)`, on the team when this thread holds it, else on this thread in
/// order. Returns when all have run; a panic in any is raised here.
pub(crate) fn for_each(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n <= 1 || !HOLDS.with(Cell::get) {
        (0..n).for_each(f);
        return;
    }
    let t = team();
    // SAFETY (lifetime): the job outlives this call only as an `Arc` a late helper may
    // hold; such a helper finds no item left to claim and never calls `f` (see `Job::run`).
    let f: *const (dyn Fn(usize) + Sync + '_) = f;
    let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
    let job = Arc::new(Job::new(f, n, t.threads));
    *t.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
    t.generation.fetch_add(1, Ordering::AcqRel);
    job.run(0);
    while job.done.load(Ordering::Acquire) < n {
        std::hint::spin_loop();
    }
    if job.panicked.load(Ordering::Relaxed) {
        panic!("a compute thread panicked in a parallel region");
    }
}

/// [`for_each`] over the items of `items`, each given to exactly one call of `f`.
pub(crate) fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    struct Items<T>(*mut T);
    // SAFETY: each index is claimed once (`for_each`), so no item is reached twice.
    unsafe impl<T: Send> Sync for Items<T> {}
    let base = Items(items.as_mut_ptr());
    let base = &base;
    for_each(items.len(), &|i| {
        // SAFETY: `i < items.len()` and index `i` is given to this call alone.
        f(unsafe { &mut *base.0.add(i) })
    });
}

/// The threads a region started now on this thread would use.
pub(crate) fn threads() -> usize {
    if HOLDS.with(Cell::get) {
        team().threads
    } else {
        1
    }
}

/// Runs `f` with every forward of this thread computing on this thread alone (the
/// batch-invariance tests compare this with the whole team).
pub fn single_threaded<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            ALONE.with(|a| a.set(self.0));
        }
    }
    let _reset = Reset(ALONE.with(|a| a.replace(true)));
    f()
}
