//! Buffers handed on as packets and used again once their packets are gone.
//!
//! A worker reads datagrams and TUN packets into buffers it then hands on whole, as the
//! packets themselves ([`node_proto::Packet`] over a `BytesMut`): no copy out of the read
//! buffer, no allocation per packet, and no free on the thread that finishes the packet. Each
//! buffer is cut from an allocation whose start a zero-length handle (its *head*) keeps; once
//! every packet cut from the allocation has been dropped, on whichever thread, the head is its
//! only owner and reclaims the whole of it, which the worker reads into again.
//!
//! Copied out one by one, each datagram cost an allocation, a copy, and a free on the thread
//! that finished its batch: on 16 CPUs the receiving worker spent 22% of its samples copying
//! datagrams out (`steer::split`), and its finishing thread 26% in `mi_free`; the sending
//! worker copied each packet read from the TUN device once more, to give it room to be sealed.

use std::collections::VecDeque;

use bytes::BytesMut;

/// Heads looked at for one buffer: the oldest first, since packets are mostly finished in the
/// order they were read. A head whose packets are still alive (one waiting for a handshake)
/// goes to the back, so it never holds up the others.
const LOOKS: usize = 4;

/// A worker's buffers of one size, and the heads of those it handed on.
pub struct Recycler {
    /// The bytes of each buffer handed out (all initialized).
    len: usize,
    /// Capacity past `len` (room to seal a packet where it lies).
    room: usize,
    /// Heads of buffers handed on, oldest first: at most `kept`, past which the oldest is let
    /// go (its allocation is freed with its last packet).
    handed: VecDeque<BytesMut>,
    kept: usize,
    /// Buffers handed on, and how many buffers were used again.
    pub handed_on: u64,
    pub reused: u64,
}

impl Recycler {
    /// Buffers of `len` bytes with `room` more capacity; keeps up to `kept` heads.
    pub fn new(len: usize, room: usize, kept: usize) -> Self {
        Self {
            len,
            room,
            handed: VecDeque::with_capacity(kept),
            kept,
            handed_on: 0,
            reused: 0,
        }
    }

    /// A buffer of `len` initialized bytes, and its head (for [`Recycler::hand_on`]): one
    /// whose packets are all gone, else a new one.
    pub fn take(&mut self) -> (BytesMut, BytesMut) {
        for _ in 0..LOOKS.min(self.handed.len()) {
            let Some(mut head) = self.handed.pop_front() else {
                break;
            };
            let Some(buf) = self.reclaim(&mut head) else {
                self.handed.push_back(head);
                continue;
            };
            self.reused += 1;
            return (head, buf);
        }
        self.fresh()
    }

    /// The whole buffer `head` heads, if all its packets are gone (`head` stays its head).
    fn reclaim(&self, head: &mut BytesMut) -> Option<BytesMut> {
        if !head.try_reclaim(self.len + self.room) {
            return None;
        }
        let mut buf = head.split_off(0);
        // SAFETY: `try_reclaim` succeeded on a zero-length handle at the start of the
        // allocation (`fresh` made it so, and nothing moves a head), so `buf` spans that
        // allocation from its start with at least `len + room` bytes of capacity. The
        // allocation was made by `BytesMut::zeroed` with that many bytes (`fresh`), and has
        // only been written since, so its first `len` bytes are initialized.
        unsafe { buf.set_len(self.len) };
        Some(buf)
    }

    /// A new buffer and its head.
    fn fresh(&self) -> (BytesMut, BytesMut) {
        let mut buf = BytesMut::zeroed(self.len + self.room);
        buf.truncate(self.len);
        let head = buf.split_to(0);
        (head, buf)
    }

    /// Notes that the buffer whose head this is was handed on as packets.
    pub fn hand_on(&mut self, head: BytesMut) {
        if self.handed.len() >= self.kept {
            self.handed.pop_front();
        }
        self.handed.push_back(head);
        self.handed_on += 1;
    }
}

/// Read buffers in fixed places (the slots one receive call fills, the buffers one TUN read
/// cuts packets into), each handed on whole as packets and put back in its place before the
/// next read once its packets are gone: a worker that finishes each batch before it reads
/// again (no pipeline) reads into the same buffers every time, warm in its cache, as it did
/// when it copied packets out of them. A place whose buffer is still out (a pipeline's batches
/// in flight) takes another from the [`Recycler`], which takes that one in its stead.
///
/// (Refilled from the recycler alone, oldest first, the places cycled through every buffer
/// ever allocated, a working set several times larger: on 2 CPUs, in three alternating pairs
/// of quick throughput runs, the tunnel then spent 2.55, 2.54 and 2.55 CPU seconds per GB
/// against 2.52, 2.51 and 2.50 for the build that copied.)
pub struct ReadSlots {
    bufs: Vec<BytesMut>,
    heads: Vec<BytesMut>,
    /// The places whose buffer was handed on since the last read.
    out: Vec<usize>,
    recycler: Recycler,
    handed_on: u64,
    back_in_place: u64,
}

impl ReadSlots {
    /// `n` places with buffers of `len` bytes and `room` more capacity; up to `kept` buffers
    /// handed on are kept for places whose own buffer is still out.
    pub fn new(n: usize, len: usize, room: usize, kept: usize) -> Self {
        let mut recycler = Recycler::new(len, room, kept);
        let (heads, bufs) = (0..n).map(|_| recycler.take()).unzip();
        Self {
            bufs,
            heads,
            out: Vec::with_capacity(n),
            recycler,
            handed_on: 0,
            back_in_place: 0,
        }
    }

    /// The buffers to read into, each back in its place if it was handed on
    /// ([`ReadSlots::hand_on`]): call before every read.
    pub fn to_read(&mut self) -> &mut [BytesMut] {
        for i in self.out.drain(..) {
            match self.recycler.reclaim(&mut self.heads[i]) {
                Some(buf) => {
                    self.bufs[i] = buf;
                    self.back_in_place += 1;
                }
                None => {
                    let (head, buf) = self.recycler.take();
                    self.recycler
                        .hand_on(std::mem::replace(&mut self.heads[i], head));
                    self.bufs[i] = buf;
                }
            }
        }
        &mut self.bufs
    }

    /// The buffers as the last read left them.
    pub fn read(&self) -> &[BytesMut] {
        &self.bufs
    }

    /// Hands on the buffer in place `i`, to be cut into packets; the place gets a buffer back
    /// before the next read.
    pub fn hand_on(&mut self, i: usize) -> BytesMut {
        self.out.push(i);
        self.handed_on += 1;
        std::mem::take(&mut self.bufs[i])
    }

    /// Buffers handed on, and how many were used again (back in their place, or in another).
    pub fn counts(&self) -> (u64, u64) {
        (self.handed_on, self.back_in_place + self.recycler.reused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer comes back only once every packet cut from it is gone, with its length and
    /// room, wherever its packets were dropped; one still alive is passed over, never
    /// written into.
    #[test]
    fn a_buffer_is_used_again_only_once_its_packets_are_gone() {
        let mut r = Recycler::new(100, 20, 8);
        let (head, mut a) = r.take();
        assert_eq!((a.len(), a.capacity()), (100, 120));
        a.fill(7);
        let a_ptr = a.as_ptr();
        r.hand_on(head);
        let mut first = a.split_to(40);
        let second = a;
        first.truncate(10);
        // Both packets alive: a new buffer.
        let (head, b) = r.take();
        assert_ne!(b.as_ptr(), a_ptr);
        r.hand_on(head);
        drop(first);
        // One of the two still alive (dropped on another thread later).
        let (head, c) = r.take();
        assert!(c.as_ptr() != a_ptr && c.as_ptr() != b.as_ptr());
        r.hand_on(head);
        assert_eq!(r.reused, 0);
        std::thread::spawn(move || drop(second)).join().unwrap();
        // The first buffer is free now; the second and third are not.
        let (head, again) = r.take();
        assert_eq!(again.as_ptr(), a_ptr);
        assert_eq!((again.len(), again.capacity()), (100, 120));
        assert!(again.iter().all(|&x| x == 7), "its bytes as they were left");
        assert_eq!(r.reused, 1);
        r.hand_on(head);
        assert_eq!(r.handed_on, 4);
        drop((b, c, again));
    }

    /// A buffer handed on comes back to its own place when its packets are gone by the next
    /// read; a place whose buffer is still out reads into another, and that one comes back
    /// through the recycler later.
    #[test]
    fn read_slots_read_into_their_own_buffers_again_once_those_are_free() {
        let mut s = ReadSlots::new(3, 64, 16, 8);
        let first: Vec<*const u8> = s.to_read().iter().map(|b| b.as_ptr()).collect();
        let a = s.hand_on(0);
        let b = s.hand_on(2);
        assert_eq!((a.as_ptr(), b.as_ptr()), (first[0], first[2]));
        drop(a);
        // Place 0's buffer is free and comes back; place 2's is still out: another one.
        let now: Vec<*const u8> = s.to_read().iter().map(|b| b.as_ptr()).collect();
        assert_eq!(now[0], first[0]);
        assert_eq!(now[1], first[1]);
        assert!(!first.contains(&now[2]));
        assert!(s.read().iter().all(|b| b.len() == 64 && b.capacity() >= 80));
        assert_eq!(s.counts(), (2, 1));
        // Once place 2's first buffer is free, a place whose buffer is out gets it.
        drop(b);
        let c = s.hand_on(1);
        assert_eq!(s.to_read()[1].as_ptr(), first[2]);
        assert_eq!(s.counts(), (3, 2));
        drop(c);
    }

    /// Past `kept` heads the oldest is let go: its buffer is never used again.
    #[test]
    fn heads_past_the_limit_are_let_go() {
        let mut r = Recycler::new(64, 0, 2);
        let bufs: Vec<BytesMut> = (0..3)
            .map(|_| {
                let (head, buf) = r.take();
                r.hand_on(head);
                buf
            })
            .collect();
        drop(bufs);
        for _ in 0..3 {
            drop(r.take());
        }
        assert_eq!(
            r.reused, 2,
            "the two heads kept came back, the one let go did not"
        );
    }

    /// Random reads, cuts, seals and drops: a packet's bytes are never written by a later read
    /// while it is alive, wherever it was cut from and whenever its siblings went, and every
    /// buffer read into has its full length and room. (Also run under Miri, which checks the
    /// `set_len` in `Recycler::reclaim`: `cargo +nightly miri test -p node --lib io::recycle`.)
    #[test]
    fn live_packets_are_never_read_into_whatever_the_order_they_go_in() {
        const LEN: usize = 96;
        const ROOM: usize = 16;
        let steps = if cfg!(miri) { 150 } else { 5_000 };
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut s = ReadSlots::new(4, LEN, ROOM, 6);
        // Live packets, each with the byte its read filled it with (and its sealed tail's).
        let mut live: Vec<(BytesMut, u8)> = Vec::new();
        for step in 0..steps {
            let tag = (step % 251) as u8 + 1;
            for b in s.to_read() {
                assert_eq!(b.len(), LEN);
                assert!(b.capacity() >= LEN + ROOM);
                b.fill(tag);
            }
            // Hand on some places, cut into packets; the last keeps the room and is sealed.
            for i in 0..4 {
                if next(3) == 0 {
                    continue;
                }
                let mut buf = s.hand_on(i);
                while buf.len() > 24 && next(2) == 0 {
                    let at = 1 + next(buf.len() - 1);
                    live.push((buf.split_to(at), tag));
                }
                if next(2) == 0 {
                    buf.truncate(next(buf.len() + 1));
                }
                buf.extend_from_slice(&[tag; ROOM]);
                live.push((buf, tag));
            }
            // Drop some, in any order (at most 48 stay alive, some for many reads); now and
            // then one on another thread.
            let drops = next(live.len() + 1).max(live.len().saturating_sub(48));
            for _ in 0..drops {
                let (p, _) = live.swap_remove(next(live.len()));
                if next(16) == 0 {
                    std::thread::spawn(move || drop(p)).join().unwrap();
                }
            }
            for (p, tag) in &live {
                assert!(p.iter().all(|b| b == tag), "a live packet was written into");
            }
        }
        let (handed, reused) = s.counts();
        assert!(handed > 0 && reused > 0, "{handed} {reused}");
    }
}
