//! A team of spinning threads for the many short parallel loops of one inference step.
//!
//! A batch-1 decode step of a small model runs ~200 GEMMs of a few hundred microseconds each,
//! every one split over the cores. Handing each split to rayon (a job pushed on a deque, stolen
//! by another worker, a latch to wait on) costs microseconds per fork, and a worker with no
//! work goes to sleep and must be woken. Inside [`with_team`], the other workers of the pool
//! instead spin on one shared word; [`par_for`] publishes a loop there, every thread of the
//! team (the caller included) claims its iterations with one atomic add, and the caller waits
//! for the last to finish. Outside a team, [`par_for`] is rayon's parallel loop.
//!
//! Helpers are rayon jobs. A worker blocked in a rayon `join` (a loop body that uses rayon)
//! may pick one up and so stop serving the work the body waits for; a helper therefore leaves
//! after [`IDLE_LIMIT`] without a new loop, and [`par_for`] spawns helpers again when too few
//! are left.
//!
//! A CUDA build needs none of this (a step is a stream of kernel launches); the interface is
//! the two functions.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A helper with no new loop for this long returns to the pool (a step's loops come every few
/// tens of microseconds; see the module notes for why helpers must not wait forever).
pub const IDLE_LIMIT: Duration = Duration::from_millis(1);

use rayon::prelude::*;

/// A loop body as the team sees it: a pointer to the caller's `&dyn Fn`.
type Body<'a> = &'a (dyn Fn(usize) + Sync);

/// Keeps the words the caller writes per loop and the word helpers write per iteration on
/// separate cache lines.
#[repr(align(128))]
struct Line<T>(T);

struct Team {
    /// The current loop's body (null between loops); a `*const Body`.
    job: Line<AtomicPtr<()>>,
    /// Bumped for every loop; helpers join a loop once per epoch.
    epoch: Line<AtomicUsize>,
    /// Iterations of the current loop.
    n: Line<AtomicUsize>,
    /// Next iteration to claim.
    next: Line<AtomicUsize>,
    /// Iterations finished.
    done: Line<AtomicUsize>,
    /// Helpers inside the current loop: the caller returns (and the body goes out of scope)
    /// only when none is.
    active: Line<AtomicUsize>,
    panicked: AtomicBool,
    stop: Line<AtomicBool>,
    /// Helper jobs spawned and not yet returned.
    helpers: Line<AtomicUsize>,
    /// Helpers the team keeps: the pool's other workers.
    want: usize,
}

thread_local! {
    /// The team whose caller runs on this thread; null elsewhere and while a loop body runs.
    static CURRENT: Cell<*const Team> = const { Cell::new(ptr::null()) };
}

/// Runs `f` on a worker of rayon's pool while every other worker spins, ready to take part in
/// the [`par_for`] loops `f` runs. Nested calls run `f` directly; a one-thread pool too.
pub fn with_team<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 || !CURRENT.with(Cell::get).is_null() {
        return f();
    }
    // On a worker of the pool (rayon injects the call when it comes from outside).
    rayon::scope(|_| {
        let team = Arc::new(Team {
            job: Line(AtomicPtr::new(ptr::null_mut())),
            epoch: Line(AtomicUsize::new(0)),
            n: Line(AtomicUsize::new(0)),
            next: Line(AtomicUsize::new(0)),
            done: Line(AtomicUsize::new(0)),
            active: Line(AtomicUsize::new(0)),
            panicked: AtomicBool::new(false),
            stop: Line(AtomicBool::new(false)),
            helpers: Line(AtomicUsize::new(0)),
            want: threads - 1,
        });
        Team::top_up(&team);
        // However `f` ends, this thread leaves the team and the helpers stop.
        let _stop = Stop(&team);
        let _lead = Restore(CURRENT.with(|c| c.replace(Arc::as_ptr(&team))));
        f()
    })
}

/// Calls `body(i)` for every `i` in `0..n`, in parallel: on the team if this thread leads one
/// (see [`with_team`]), else on rayon's pool. Returns when all calls have returned.
pub fn par_for(n: usize, body: impl Fn(usize) + Sync + Send) {
    if n <= 1 {
        (0..n).for_each(body);
        return;
    }
    let team = CURRENT.with(Cell::get);
    if team.is_null() {
        (0..n).into_par_iter().for_each(body);
        return;
    }
    // SAFETY: CURRENT points at a team that `with_team` keeps alive (an `Arc`) while it is set.
    let team = unsafe {
        Arc::increment_strong_count(team);
        Arc::from_raw(team)
    };
    if team.helpers.0.load(SeqCst) < team.want {
        Team::top_up(&team);
    }
    let body: Body = &body;
    // Nested loops in the body run on rayon, not on this team.
    let _lead = Restore(CURRENT.with(|c| c.replace(ptr::null())));
    team.n.0.store(n, SeqCst);
    team.next.0.store(0, SeqCst);
    team.done.0.store(0, SeqCst);
    team.job.0.store(&body as *const Body as *mut (), SeqCst);
    team.epoch.0.fetch_add(1, SeqCst);
    team.work(body);
    while team.done.0.load(Acquire) < n {
        std::hint::spin_loop();
    }
    // No helper may still hold the body once this returns: retract it, then wait for any
    // helper that took it before the retraction to leave.
    team.job.0.store(ptr::null_mut(), SeqCst);
    while team.active.0.load(SeqCst) != 0 {
        std::hint::spin_loop();
    }
    if team.panicked.swap(false, SeqCst) {
        panic!("an iteration of a parallel loop panicked");
    }
}

/// Splits `0..items` into ranges for [`par_for`] that shrink as the work runs out (guided
/// scheduling): each range takes `1 / (2 * threads)` of what is left, at least `min` items. The
/// first claims are large (few atomic claims per loop), the last small, so the threads finish
/// within about one small range of each other instead of one waiting on the other's last
/// large chunk.
pub fn guided_ranges(items: usize, threads: usize, min: usize) -> Vec<(usize, usize)> {
    let (min, share) = (min.max(1), 2 * threads.max(1));
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < items {
        let len = (items - start).div_ceil(share).max(min).min(items - start);
        ranges.push((start, start + len));
        start += len;
    }
    ranges
}

/// Sets its flag if dropped while the thread unwinds: work items that other threads of a loop
/// wait on (spinning) hold one, and the waits give up once it is set, so a panic in one item
/// reaches the caller instead of leaving the loop spinning forever.
pub struct FlagOnUnwind<'a>(pub &'a AtomicBool);

impl Drop for FlagOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, SeqCst);
        }
    }
}

/// Spins until `ready()`; panics if `failed` is set first (the work waited on panicked).
pub fn spin_until(ready: impl Fn() -> bool, failed: &AtomicBool, what: &str) {
    while !ready() {
        if failed.load(SeqCst) {
            panic!("{what}: the work waited on panicked on another thread");
        }
        std::hint::spin_loop();
    }
}

impl Team {
    /// Spawns helpers until `want` are running or queued.
    fn top_up(team: &Arc<Team>) {
        while team.helpers.0.load(SeqCst) < team.want {
            team.helpers.0.fetch_add(1, SeqCst);
            let t = team.clone();
            rayon::spawn(move || t.help());
        }
    }

    /// Claims and runs iterations of the current loop until none is left.
    fn work(&self, body: Body) {
        let n = self.n.0.load(SeqCst);
        loop {
            let i = self.next.0.fetch_add(1, SeqCst);
            if i >= n {
                return;
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.0.fetch_add(1, Release);
        }
    }

    /// A helper's loop: join each published loop once; between loops run any rayon work
    /// queued in the pool (nested loops of a body), else spin; leave when the team stops or
    /// after [`IDLE_LIMIT`] without a loop.
    fn help(&self) {
        let (mut seen, mut idle) = (0, 0u32);
        let mut idle_since: Option<Instant> = None;
        while !self.stop.0.load(Acquire) {
            let epoch = self.epoch.0.load(Acquire);
            if epoch == seen {
                // Watch the epoch closely (a loop starts every few tens of microseconds in a
                // decode step); only now and then look for queued rayon work, which is slower,
                // and at the clock.
                idle += 1;
                if idle % 64 == 0 {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle_since = None;
                        continue;
                    }
                    let now = Instant::now();
                    if now.duration_since(*idle_since.get_or_insert(now)) > IDLE_LIMIT {
                        break;
                    }
                }
                std::hint::spin_loop();
                continue;
            }
            idle_since = None;
            seen = epoch;
            self.active.0.fetch_add(1, SeqCst);
            let job = self.job.0.load(SeqCst) as *const Body;
            if !job.is_null() {
                // SAFETY: the caller retracts `job` and then waits for `active` to drop to
                // zero before the body goes out of scope; this helper counted itself active
                // before reading `job`, so either it read null or the caller waits for it.
                self.work(unsafe { *job });
            }
            self.active.0.fetch_sub(1, SeqCst);
        }
        self.helpers.0.fetch_sub(1, SeqCst);
    }
}

/// Sets this thread's team pointer back to the saved one when dropped.
struct Restore(*const Team);

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Stops the team's helpers when dropped.
struct Stop<'a>(&'a Team);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.stop.0.store(true, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop whose iteration 1 waits on the work of iteration 0, which panics: the loop
    /// must return the panic to the caller instead of spinning forever (in a team and on
    /// rayon's pool alike).
    #[test]
    fn a_wait_on_work_that_panicked_fails_instead_of_spinning() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for in_team in [true, false] {
            let (failed, done) = (AtomicBool::new(false), AtomicBool::new(false));
            let body = |i: usize| {
                if i == 0 {
                    let _flag = FlagOnUnwind(&failed);
                    panic!("the work item fails");
                }
                spin_until(|| done.load(SeqCst), &failed, "test wait");
            };
            let run = || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| par_for(2, body)));
            let result = pool.install(|| if in_team { with_team(run) } else { run() });
            assert!(result.is_err(), "in_team {in_team}: the panic reaches the caller");
            assert!(failed.load(SeqCst));
        }
    }

    #[test]
    fn guided_ranges_cover_everything_in_shrinking_ranges() {
        for (items, threads, min) in [(0, 2, 1), (1, 2, 1), (12, 2, 1), (1024, 2, 1), (1024, 8, 4), (7, 1, 1), (100, 3, 50)] {
            let r = guided_ranges(items, threads, min);
            let mut next = 0;
            for (i, &(a, b)) in r.iter().enumerate() {
                assert_eq!(a, next, "{items}/{threads}: ranges must tile in order");
                assert!(b > a, "{items}/{threads}: empty range");
                assert!(b - a >= min.min(items - a), "{items}/{threads}: range under min");
                if i > 0 {
                    assert!(b - a <= r[i - 1].1 - r[i - 1].0, "{items}/{threads}: ranges must shrink");
                }
                next = b;
            }
            assert_eq!(next, items);
            if items >= 4 * threads * min {
                // The last ranges are small: at most min items (+ rounding) each.
                assert!(r.last().map_or(0, |&(a, b)| b - a) <= min.max(1), "{items}/{threads}: {r:?}");
                assert!(r.first().map_or(0, |&(a, b)| b - a) <= items.div_ceil(2 * threads), "{r:?}");
            }
        }
        // Large loops take few claims: about 2 * threads * ln(items) ranges.
        assert!(guided_ranges(1024, 2, 1).len() <= 40);
    }

    #[test]
    fn every_iteration_runs_once_in_and_out_of_a_team() {
        for n in [0usize, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            par_for(n, |i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
            with_team(|| {
                for _ in 0..50 {
                    par_for(n, |i| {
                        hits[i].fetch_add(1, SeqCst);
                    });
                }
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 51), "n = {n}");
        }
    }

    #[test]
    fn nested_loops_and_nested_teams_complete() {
        let sum = AtomicUsize::new(0);
        with_team(|| {
            par_for(8, |i| {
                par_for(8, |j| {
                    sum.fetch_add(i * 8 + j, SeqCst);
                });
                with_team(|| sum.fetch_add(1000, SeqCst));
            });
        });
        assert_eq!(sum.load(SeqCst), (0..64).sum::<usize>() + 8000);
    }

    /// Bodies that use rayon, in a pool of more threads than loops need: a worker waiting in a
    /// `join` may pick up a helper job; the helper leaves when idle, so every loop completes.
    #[test]
    fn bodies_that_use_rayon_complete_in_larger_pools() {
        for threads in [3, 4, 8] {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let sum = AtomicUsize::new(0);
                pool.install(|| {
                    with_team(|| {
                        for _ in 0..20 {
                            par_for(64, |i| {
                                (0..8).into_par_iter().for_each(|j| {
                                    std::thread::sleep(Duration::from_micros(20));
                                    sum.fetch_add(i * 8 + j, SeqCst);
                                });
                            });
                        }
                    })
                });
                tx.send(sum.load(SeqCst)).unwrap();
            });
            let got = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("{threads} threads: the loops did not complete"));
            assert_eq!(got, 20 * (0..512).sum::<usize>());
        }
    }

    #[test]
    fn a_panicking_iteration_reaches_the_caller_and_the_team_ends() {
        let r = std::panic::catch_unwind(|| {
            with_team(|| {
                par_for(4, |i| assert!(i != 2, "iteration 2 fails"));
            })
        });
        assert!(r.is_err());
        // The pool still works.
        let sum = AtomicUsize::new(0);
        with_team(|| par_for(10, |i| {
            sum.fetch_add(i, SeqCst);
        }));
        assert_eq!(sum.load(SeqCst), 45);
    }
}
