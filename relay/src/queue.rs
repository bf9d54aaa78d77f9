//! A session's queue of frames to its node, bounded by frames and by bytes.
//!
//! A node that stops reading (or reads slowly) lets its queue at the relay fill: bounded by
//! frames alone, a queue of 2,048 held 8 MB of the largest frames, though full WireGuard packets
//! fill it at under 3 MB. The byte bound keeps what any one node costs the relay near what its
//! traffic needs; a frame that does not fit is dropped (and counted by the caller), as a full
//! socket buffer drops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

/// A queue holding at most `frames` frames and `bytes` bytes of them (one frame always fits
/// an empty queue).
pub(crate) fn channel(frames: usize, bytes: usize) -> (Sender, Receiver) {
    let (tx, rx) = mpsc::channel(frames);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Sender {
            tx,
            queued: Arc::clone(&queued),
            max: bytes,
        },
        Receiver { rx, queued },
    )
}

/// The queue's sending side (cheap to clone).
#[derive(Clone, Debug)]
pub(crate) struct Sender {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
    max: usize,
}

impl Sender {
    /// Queues `frame` if there is room for it; false if it was dropped (the queue is full, or
    /// its receiver gone).
    pub(crate) fn try_send(&self, frame: Bytes) -> bool {
        let n = frame.len();
        let room = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q == 0 || q + n <= self.max).then_some(q + n)
            });
        if room.is_err() {
            return false;
        }
        if self.tx.try_send(frame).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Bytes queued now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// The queue's receiving side.
#[derive(Debug)]
pub(crate) struct Receiver {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Receiver {
    /// The next frame; `None` once every sender is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        let f = self.rx.recv().await?;
        self.queued.fetch_sub(f.len(), Ordering::AcqRel);
        Some(f)
    }

    /// The next frame if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Bytes> {
        let f = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(f.len(), Ordering::AcqRel);
        Some(f)
    }
}

/// A queue of batches of frames, bounded as [`channel`] is (by frames and by bytes, one frame
/// always fitting an empty queue): a sender hands over what it has for the receiver at once,
/// which wakes the receiver once for the batch instead of once per frame.
pub(crate) fn batch_channel(frames: usize, bytes: usize) -> (BatchSender, BatchReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicU64::new(0));
    (
        BatchSender {
            tx,
            queued: Arc::clone(&queued),
            frames: frames.min(MAX_FRAMES),
            bytes: bytes.min(MAX_BYTES),
        },
        BatchReceiver { rx, queued },
    )
}

/// Frames and bytes queued, counted in one word: frames above [`BYTES_BITS`], bytes below.
const BYTES_BITS: u32 = 40;
const MAX_BYTES: usize = (1 << BYTES_BITS) - 1;
const MAX_FRAMES: usize = (1 << (64 - BYTES_BITS)) - 1;

fn unpack(q: u64) -> (usize, usize) {
    ((q >> BYTES_BITS) as usize, (q & MAX_BYTES as u64) as usize)
}

fn pack(frames: usize, bytes: usize) -> u64 {
    ((frames as u64) << BYTES_BITS) | bytes as u64
}

/// A [`batch_channel`]'s sending side (cheap to clone).
#[derive(Clone, Debug)]
pub(crate) struct BatchSender {
    tx: mpsc::UnboundedSender<Vec<Bytes>>,
    queued: Arc<AtomicU64>,
    frames: usize,
    bytes: usize,
}

impl BatchSender {
    /// Queues as many of `batch`'s frames, from the first, as there is room for; how many
    /// (those after are dropped, and are the caller's to count).
    pub(crate) fn try_send(&self, mut batch: Vec<Bytes>) -> usize {
        let mut taken = 0;
        let room = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                let (mut frames, mut bytes) = unpack(q);
                taken = 0;
                for f in &batch {
                    let fits = (frames == 0 && bytes == 0)
                        || (frames < self.frames && bytes + f.len() <= self.bytes);
                    if !fits {
                        break;
                    }
                    frames += 1;
                    bytes += f.len();
                    taken += 1;
                }
                (taken > 0).then(|| pack(frames, bytes))
            });
        if room.is_err() {
            return 0;
        }
        batch.truncate(taken);
        let bytes: usize = batch.iter().map(Bytes::len).sum();
        if self.tx.send(batch).is_err() {
            self.queued.fetch_sub(pack(taken, bytes), Ordering::AcqRel);
            return 0;
        }
        taken
    }

    /// Bytes queued now.
    pub(crate) fn queued(&self) -> usize {
        unpack(self.queued.load(Ordering::Acquire)).1
    }
}

/// A [`batch_channel`]'s receiving side.
#[derive(Debug)]
pub(crate) struct BatchReceiver {
    rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
    queued: Arc<AtomicU64>,
}

impl BatchReceiver {
    /// The next batch; `None` once every sender is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<Vec<Bytes>> {
        let b = self.rx.recv().await?;
        self.taken(&b);
        Some(b)
    }

    /// The next batch if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Vec<Bytes>> {
        let b = self.rx.try_recv().ok()?;
        self.taken(&b);
        Some(b)
    }

    fn taken(&self, batch: &[Bytes]) {
        let bytes: usize = batch.iter().map(Bytes::len).sum();
        self.queued
            .fetch_sub(pack(batch.len(), bytes), Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_queue_takes_what_fits_of_each_batch_in_order_and_hands_batches_whole() {
        let f = |n: usize| Bytes::from(vec![n as u8; n]);
        // By bytes: 1,000 bytes take 400 + 400, then 200 more of the next batch.
        let (tx, mut rx) = batch_channel(8, 1000);
        assert_eq!(
            tx.try_send(vec![f(400), f(400), f(400)]),
            2,
            "past the bytes"
        );
        assert_eq!(
            tx.try_send(vec![f(200), f(1)]),
            1,
            "what still fits, in order"
        );
        assert_eq!(tx.queued(), 1000);
        assert_eq!(tx.try_send(vec![f(1)]), 0, "full");
        assert_eq!(rx.recv().await.unwrap(), vec![f(400), f(400)]);
        assert_eq!(tx.queued(), 200);
        assert_eq!(rx.try_recv().unwrap(), vec![f(200)]);
        assert!(rx.try_recv().is_none());
        // A frame larger than the bound goes into an empty queue, and nothing after it.
        assert_eq!(tx.try_send(vec![f(1500), f(1)]), 1);
        assert_eq!(tx.try_send(vec![f(1)]), 0);
        assert_eq!(rx.recv().await.unwrap(), vec![f(1500)]);
        // By frames: small ones stop at the frame count, across batches.
        assert_eq!(tx.try_send((0..5).map(|_| f(4)).collect()), 5);
        assert_eq!(tx.try_send((0..5).map(|_| f(4)).collect()), 3);
        assert_eq!(tx.queued(), 32);
        // One batch is one message: the receiver finds each whole.
        assert_eq!(rx.recv().await.unwrap().len(), 5);
        assert_eq!(rx.recv().await.unwrap().len(), 3);
        assert_eq!(tx.queued(), 0);
        // Gone: nothing is queued, nothing counted.
        drop(rx);
        assert_eq!(tx.try_send(vec![f(4)]), 0);
        assert_eq!(tx.queued(), 0);
    }

    #[tokio::test]
    async fn a_queue_holds_its_frames_or_its_bytes_whichever_comes_first() {
        // By bytes: three 400-byte frames fit 1,000 bytes only twice.
        let (tx, mut rx) = channel(8, 1000);
        let f = Bytes::from(vec![1u8; 400]);
        assert!(tx.try_send(f.clone()) && tx.try_send(f.clone()));
        assert!(!tx.try_send(f.clone()), "past the bytes");
        assert!(tx.try_send(Bytes::from(vec![2u8; 200])), "what still fits");
        assert_eq!(tx.queued(), 1000);
        assert_eq!(rx.recv().await.unwrap().len(), 400);
        assert!(tx.try_send(f.clone()), "room again");
        for want in [400, 200, 400] {
            assert_eq!(rx.try_recv().unwrap().len(), want);
        }
        assert!(rx.try_recv().is_none());
        assert_eq!(tx.queued(), 0);
        // A frame larger than the bound goes into an empty queue, and nothing after it.
        let big = Bytes::from(vec![3u8; 1500]);
        assert!(tx.try_send(big.clone()) && !tx.try_send(Bytes::from_static(b"x")));
        assert_eq!(rx.recv().await.unwrap(), big);
        // By frames: small ones stop at the frame count.
        let sent = (0..20)
            .filter(|_| tx.try_send(Bytes::from_static(b"tiny")))
            .count();
        assert_eq!(sent, 8);
        assert_eq!(tx.queued(), 32);
        // Gone: nothing is queued, nothing counted.
        drop(rx);
        assert!(!tx.try_send(Bytes::from_static(b"late")));
    }
}
