//! A session's queue of frames to its node, bounded by frames and by bytes.
//!
//! A node that stops reading (or reads slowly) lets its queue at the relay fill: bounded by
//! frames alone, a queue of 2,048 held 8 MB of the largest frames, though full WireGuard packets
//! fill it at under 3 MB. The byte bound keeps what any one node costs the relay near what its
//! traffic needs; a frame that does not fit is dropped (and counted by the caller), as a full
//! socket buffer drops.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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

#[cfg(test)]
mod tests {
    use super::*;

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
