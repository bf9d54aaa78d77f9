//! Threads that share a batch's AEAD (`--aead-helpers N`, `LATTICE_AEAD_HELPERS`).
//!
//! A worker's crypto thread runs its batches' AEAD one after another; one stream's packets all
//! come through one worker, so without help one stream gets one core's worth of encryption.
//! With helpers, a crypto thread whose batch is big enough keeps its first part and puts the
//! rest, in parts of at least [`MIN_PART`] jobs, on a queue the helpers serve; while it
//! waits for them it serves the queue too (its own parts or another crypto thread's), so a
//! batch never waits for a busy pool. The jobs come back in their batch's order: the core
//! took their counters in that order before any was sealed
//! ([`node_proto::shared::crypt_prepared`]), so each flow still leaves in order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use node_proto::CryptoJob;

/// The fewest jobs worth handing to another thread (about 20 us of AEAD at 1.2 us a
/// 1,280-byte packet on the device's Xeon): a hand-over and its wake-up cost a few.
pub const MIN_PART: usize = 16;

/// The AEAD helpers: parts of batches of crypto jobs.
pub type AeadHelpers = Helpers<CryptoJob>;
/// A crypto thread's side of [`AeadHelpers`].
pub type Asker = PartsBack<CryptoJob>;

impl AeadHelpers {
    /// Starts `helpers` threads (`lattice-aeadhN`); none for 0.
    pub fn start(helpers: usize) -> std::io::Result<Self> {
        Self::start_with(helpers, "lattice-aeadh", CryptoJob::crypt_queue)
    }
}

type Returned<T> = (usize, VecDeque<T>);

/// A part of a batch on the queue, and where it goes back.
struct Part<T> {
    index: usize,
    items: VecDeque<T>,
    back: mpsc::Sender<Returned<T>>,
}

impl<T> Part<T> {
    fn run(mut self, work: fn(&mut VecDeque<T>)) {
        work(&mut self.items);
        // The asker waits for every part it handed out; it is gone only if it panicked.
        let _ = self.back.send((self.index, self.items));
    }
}

struct Queue<T> {
    parts: VecDeque<Part<T>>,
    closed: bool,
}

/// Threads serving a queue of parts of batches, and the queue. Dropping it stops the
/// threads once the queue is empty.
pub struct Helpers<T> {
    queue: Arc<(Mutex<Queue<T>>, Condvar)>,
    helpers: usize,
    work: fn(&mut VecDeque<T>),
    /// Parts handed out so far (for status).
    handed_out: AtomicU64,
}

/// One asking thread's side of the pool: where its parts come back.
pub struct PartsBack<T> {
    back: mpsc::Sender<Returned<T>>,
    returned: mpsc::Receiver<Returned<T>>,
    parts: Vec<Option<VecDeque<T>>>,
}

impl<T> Default for PartsBack<T> {
    fn default() -> Self {
        let (back, returned) = mpsc::channel();
        Self {
            back,
            returned,
            parts: Vec::new(),
        }
    }
}

impl<T: Send + 'static> Helpers<T> {
    /// Starts `helpers` threads (named `name` and their number) that run `work` on parts.
    pub fn start_with(
        helpers: usize,
        name: &str,
        work: fn(&mut VecDeque<T>),
    ) -> std::io::Result<Self> {
        let queue = Arc::new((
            Mutex::new(Queue {
                parts: VecDeque::new(),
                closed: false,
            }),
            Condvar::new(),
        ));
        for i in 0..helpers {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("{name}{i}"))
                .spawn(move || serve(&queue, work))?;
        }
        Ok(Self {
            queue,
            helpers,
            work,
            handed_out: AtomicU64::new(0),
        })
    }

    /// How many helper threads run.
    pub fn helpers(&self) -> usize {
        self.helpers
    }

    /// How many parts of batches were put on the queue so far.
    pub fn handed_out(&self) -> u64 {
        self.handed_out.load(Ordering::Relaxed)
    }

    /// Runs the work on `jobs` (for the AEAD: prepared, see
    /// [`node_proto::shared::crypt_prepared`]), sharing it with the helpers when there are
    /// enough, and leaves them in order.
    pub fn crypt(&self, asker: &mut PartsBack<T>, jobs: &mut VecDeque<T>) {
        let parts = (jobs.len() / MIN_PART).min(self.helpers + 1);
        if parts < 2 {
            (self.work)(jobs);
            return;
        }
        let per = jobs.len().div_ceil(parts);
        asker.parts.clear();
        asker.parts.resize_with(parts - 1, || None);
        {
            let (lock, wake) = &*self.queue;
            let mut q = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Parts 1.. go on the queue (split off the tail, the last first); the asker
            // keeps part 0.
            for index in (1..parts).rev() {
                let tail = jobs.split_off(index * per);
                q.parts.push_back(Part {
                    index: index - 1,
                    items: tail,
                    back: asker.back.clone(),
                });
            }
            drop(q);
            self.handed_out
                .fetch_add(parts as u64 - 1, Ordering::Relaxed);
            for _ in 1..parts {
                wake.notify_one();
            }
        }
        (self.work)(jobs);
        let mut missing = parts - 1;
        while missing > 0 {
            // Serve the queue while parts are out; wait only when it is empty (then every
            // part still out is being run by someone, who sends it back).
            let back = match self.take() {
                Some(part) => {
                    part.run(self.work);
                    asker.returned.try_recv().ok()
                }
                None => asker.returned.recv().ok(),
            };
            if let Some((index, part)) = back {
                asker.parts[index] = Some(part);
                missing -= 1;
            }
        }
        for part in asker.parts.drain(..).flatten() {
            jobs.extend(part);
        }
    }

    fn take(&self) -> Option<Part<T>> {
        let (lock, _) = &*self.queue;
        lock.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .parts
            .pop_front()
    }
}

impl<T> Drop for Helpers<T> {
    fn drop(&mut self) {
        let (lock, wake) = &*self.queue;
        lock.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .closed = true;
        wake.notify_all();
    }
}

/// A helper's loop: runs parts until the pool is dropped.
fn serve<T>(queue: &(Mutex<Queue<T>>, Condvar), work: fn(&mut VecDeque<T>)) {
    let (lock, wake) = queue;
    loop {
        let part = {
            let mut q = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            loop {
                if let Some(p) = q.parts.pop_front() {
                    break p;
                }
                if q.closed {
                    return;
                }
                q = wake
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        part.run(work);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;

    /// Marks each item with the thread that ran it, slowly enough that helpers get parts.
    fn mark(items: &mut VecDeque<(u32, Option<String>)>) {
        std::thread::sleep(Duration::from_millis(2));
        let me = std::thread::current().name().unwrap_or("asker").to_owned();
        for (_, by) in items.iter_mut() {
            *by = Some(me.clone());
        }
    }

    fn batch(n: u32) -> VecDeque<(u32, Option<String>)> {
        (0..n).map(|i| (i, None)).collect()
    }

    /// Batches from three asking threads at once come back whole and in order, every item
    /// worked on, big ones shared with the helpers, small ones kept by their asker.
    #[test]
    fn parts_come_back_in_order_from_every_thread_and_small_batches_stay() {
        let pool = Helpers::start_with(3, "helper", mark).expect("helpers");
        let pool = &pool;
        let ran: Vec<BTreeSet<String>> = std::thread::scope(|s| {
            let askers: Vec<_> = (0..3)
                .map(|a| {
                    s.spawn(move || {
                        let mut back = PartsBack::default();
                        let mut threads = BTreeSet::new();
                        for round in 0..20u32 {
                            let n = [100, 15, 64, 33, 1][(round + a) as usize % 5];
                            let mut items = batch(n);
                            pool.crypt(&mut back, &mut items);
                            let order: Vec<u32> = items.iter().map(|(i, _)| *i).collect();
                            assert_eq!(order, (0..n).collect::<Vec<_>>(), "batch of {n}");
                            let by: BTreeSet<String> = items
                                .iter()
                                .map(|(_, by)| by.clone().expect("worked on"))
                                .collect();
                            if (n as usize) < 2 * MIN_PART {
                                assert_eq!(by.len(), 1, "a batch of {n} stays with its asker");
                            }
                            threads.extend(by);
                        }
                        threads
                    })
                })
                .collect();
            askers
                .into_iter()
                .map(|h| h.join().expect("asker"))
                .collect()
        });
        assert!(pool.handed_out() > 0);
        let all: BTreeSet<&String> = ran.iter().flatten().collect();
        assert!(
            all.iter().any(|t| t.starts_with("helper")),
            "helpers took parts: {all:?}"
        );
    }

    /// With no helper free (none started), an asker runs its own parts off the queue: a big
    /// batch still comes back whole.
    #[test]
    fn an_asker_runs_its_own_parts_when_no_helper_takes_them() {
        let mut pool = Helpers::start_with(0, "none", mark).expect("no helpers");
        // As if three were started and all were busy elsewhere.
        pool.helpers = 3;
        let mut back = PartsBack::default();
        let mut items = batch(100);
        pool.crypt(&mut back, &mut items);
        assert_eq!(items.len(), 100);
        assert!(
            items
                .iter()
                .enumerate()
                .all(|(i, (n, by))| *n == i as u32 && by.is_some())
        );
    }
}
