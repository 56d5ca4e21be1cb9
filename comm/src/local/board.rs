//! The region board of a lane: where each rank of a group publishes the buffer of the
//! collective it is running, so that its peers can read (and, for an all-reduce, write) that
//! buffer in place instead of receiving copies of it through channels.
//!
//! # The contract, and why it is safe
//! A rank *publishes* its buffer for one operation (the lane's sequence number) and gets a
//! [`Publication`] guard that mutably (or, for an input, immutably) borrows the buffer: while
//! the guard lives, the owner itself cannot touch the buffer except through the guard, so
//! every access during the collective goes through the one raw pointer published here.
//!
//! A peer that wants to access a published buffer *pins* it ([`Board::pin`]): under the slot's
//! lock it checks that the region is still published for the same operation, with the same
//! element type and length, and counts itself as a reader. Dropping the guard *revokes* the
//! region: under the same lock it withdraws it, so no new pin can succeed, and then waits
//! until every pin is released. Hence:
//!
//! * a buffer is never accessed by a peer after its owner's `Publication` is dropped, on any
//!   path (success, error, timeout, poison, or a panic unwinding through the owner), because
//!   the drop does not return while pins are held (no use after free, no access after the
//!   collective returned);
//! * the wait is bounded without a timeout, because pins are held only while a peer computes
//!   on plain slices ([`Pins`] is dropped before the peer waits on anything; a panic while
//!   pinned unpins during unwinding);
//! * memory is synchronised: everything a rank wrote before publishing happens-before a
//!   peer's pin (same mutex), and a peer's writes happen-before its unpin, which
//!   happens-before the owner's revocation returns.
//!
//! Which *parts* of a pinned buffer a peer may touch is the algorithm's business (disjoint
//! chunks per rank, see `in_place`), as is telling the owner when it may revoke without
//! making a slower peer's pin fail (a round of "done" messages on the lane).

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};

use super::shared::lock;
use crate::dtype::{DType, Element};

/// A published buffer: where it is, what it holds, and for which operation.
#[derive(Clone, Copy)]
struct Region {
    seq: u64,
    addr: NonNull<u8>,
    elems: usize,
    dtype: DType,
    /// Whether peers may write it (an all-reduce buffer) or only read it (an input).
    writable: bool,
}

#[derive(Default)]
struct SlotState {
    region: Option<Region>,
    /// Peers that pinned `region` and have not unpinned it yet.
    pins: usize,
}

// SAFETY: `Region` is a plain address; who may dereference it, and when, is governed by the
// pin / revoke protocol of this module (see the module docs), not by the thread holding it.
unsafe impl Send for SlotState {}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    drained: Condvar,
}

/// The board of one lane of one group: a slot per rank.
pub(super) struct Board {
    slots: Vec<Slot>,
}

impl Board {
    /// A board for a group of `n` ranks.
    pub(super) fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: (0..n).map(|_| Slot::default()).collect(),
        })
    }

    fn set(&self, rank: usize, region: Region) {
        let mut s = lock(&self.slots[rank].state);
        debug_assert!(
            s.region.is_none() && s.pins == 0,
            "slot {rank} still in use"
        );
        s.region = Some(region);
    }

    /// Publishes `buf` (rank `rank`'s, for operation `seq`) for peers to read and write.
    pub(super) fn publish_mut<'b, T: Element>(
        &'b self,
        rank: usize,
        seq: u64,
        buf: &'b mut [T],
    ) -> Publication<'b, T> {
        let addr = NonNull::from(&mut *buf).cast::<T>();
        self.set(
            rank,
            Region {
                seq,
                addr: addr.cast(),
                elems: buf.len(),
                dtype: T::DTYPE,
                writable: true,
            },
        );
        Publication {
            board: self,
            rank,
            addr,
            elems: buf.len(),
            _buf: PhantomData,
        }
    }

    /// Publishes `buf` (rank `rank`'s, for operation `seq`) for peers to read only.
    pub(super) fn publish<'b, T: Element>(
        &'b self,
        rank: usize,
        seq: u64,
        buf: &'b [T],
    ) -> Publication<'b, T> {
        let addr = NonNull::from(buf).cast::<T>();
        self.set(
            rank,
            Region {
                seq,
                addr: addr.cast(),
                elems: buf.len(),
                dtype: T::DTYPE,
                writable: false,
            },
        );
        Publication {
            board: self,
            rank,
            addr,
            elems: buf.len(),
            _buf: PhantomData,
        }
    }

    /// Pins every rank's region but `me`'s for operation `seq`, each `elems` elements of `T`
    /// (and writable when `write`). On success the pointers are in rank order (`me`'s slot
    /// left `None`, for the caller to fill with its own); on failure nothing stays pinned and
    /// the error names the first rank whose region was not there (it already left the
    /// operation).
    pub(super) fn pin_peers<T: Element>(
        &self,
        me: usize,
        seq: u64,
        elems: usize,
        write: bool,
    ) -> Result<Pins<'_, T>, usize> {
        let mut pins = Pins {
            board: self,
            ptrs: vec![None; self.slots.len()],
        };
        for (q, slot) in self.slots.iter().enumerate() {
            if q == me {
                continue;
            }
            let mut s = lock(&slot.state);
            match s.region {
                Some(r)
                    if r.seq == seq
                        && r.dtype == T::DTYPE
                        && r.elems == elems
                        && (r.writable || !write) =>
                {
                    s.pins += 1;
                    pins.ptrs[q] = Some(r.addr.cast::<T>());
                }
                // Dropping `pins` releases what was pinned so far.
                _ => return Err(q),
            }
        }
        Ok(pins)
    }

    fn unpin(&self, rank: usize) {
        let slot = &self.slots[rank];
        let mut s = lock(&slot.state);
        s.pins -= 1;
        if s.pins == 0 {
            slot.drained.notify_all();
        }
    }

    fn revoke(&self, rank: usize) {
        let slot = &self.slots[rank];
        let mut s = lock(&slot.state);
        s.region = None;
        while s.pins > 0 {
            // No timeout: pins are held only while a peer computes (see the module docs).
            s = slot
                .drained
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// A rank's own published buffer; revoked (waiting for every peer's pin to be released) when
/// dropped. Borrows the buffer, so its owner reaches it only through [`Publication::ptr`].
pub(super) struct Publication<'b, T> {
    board: &'b Board,
    rank: usize,
    addr: NonNull<T>,
    elems: usize,
    _buf: PhantomData<&'b mut [T]>,
}

impl<T> Publication<'_, T> {
    /// The published buffer's address (valid for `len()` elements while `self` lives).
    pub(super) fn ptr(&self) -> NonNull<T> {
        self.addr
    }

    pub(super) fn len(&self) -> usize {
        self.elems
    }
}

impl<T> Drop for Publication<'_, T> {
    fn drop(&mut self) {
        self.board.revoke(self.rank);
    }
}

/// Peers' regions pinned by one rank; unpinned when dropped.
pub(super) struct Pins<'a, T> {
    board: &'a Board,
    ptrs: Vec<Option<NonNull<T>>>,
}

impl<T> Pins<'_, T> {
    /// The pinned addresses in rank order, with `own` (the caller's buffer) in its slot.
    pub(super) fn with_own(&self, me: usize, own: NonNull<T>) -> Vec<NonNull<T>> {
        self.ptrs
            .iter()
            .enumerate()
            .map(|(q, p)| if q == me { own } else { p.unwrap_or(own) })
            .collect()
    }
}

impl<T> Drop for Pins<'_, T> {
    fn drop(&mut self) {
        for (q, p) in self.ptrs.iter().enumerate() {
            if p.is_some() {
                self.board.unpin(q);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn pins_match_operation_type_length_and_access() {
        let board = Board::new(2);
        let mut buf = vec![1.0f32; 8];
        let _mine = board.publish_mut(0, 7, &mut buf);
        assert!(board.pin_peers::<f32>(1, 7, 8, true).is_ok());
        assert_eq!(board.pin_peers::<f32>(1, 6, 8, true).err(), Some(0));
        assert_eq!(board.pin_peers::<f32>(1, 7, 9, true).err(), Some(0));
        assert_eq!(board.pin_peers::<i64>(1, 7, 8, false).err(), Some(0));
        let input = vec![1i64; 3];
        let board = Board::new(2);
        let _theirs = board.publish(0, 1, &input);
        assert!(board.pin_peers::<i64>(1, 1, 3, false).is_ok());
        assert_eq!(
            board.pin_peers::<i64>(1, 1, 3, true).err(),
            Some(0),
            "read only"
        );
    }

    #[test]
    fn a_failed_pin_keeps_nothing_pinned() {
        let board = Board::new(3);
        let mut a = vec![0.0f32; 4];
        let mut b = vec![0.0f32; 4];
        let pa = board.publish_mut(0, 0, &mut a);
        drop(board.publish_mut(1, 0, &mut b));
        // Rank 2 pins rank 0, then finds rank 1 gone: the error names rank 1 and rank 0's
        // pin is released (else dropping `pa` would wait forever).
        assert_eq!(board.pin_peers::<f32>(2, 0, 4, true).err(), Some(1));
        drop(pa);
    }

    #[test]
    fn revoking_waits_for_every_pin() {
        let board = Board::new(2);
        let mut buf = vec![0i64; 1024];
        let released = AtomicBool::new(false);
        let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let mine = board.publish_mut(0, 3, &mut buf);
            s.spawn(|| {
                let mut own = [0i64; 1];
                let pins = board
                    .pin_peers::<i64>(1, 3, 1024, true)
                    .expect("published for operation 3");
                pinned_tx.send(()).expect("owner waits");
                std::thread::sleep(Duration::from_millis(200));
                let peer = pins.with_own(1, NonNull::from(&mut own[0]))[0];
                // SAFETY: rank 0's buffer of 1024 i64 is pinned; this thread is its only
                // user while the owner waits in the revocation.
                unsafe { peer.as_ptr().add(1023).write(42) };
                released.store(true, Ordering::SeqCst);
                drop(pins);
            });
            pinned_rx.recv().expect("peer pinned");
            drop(mine); // blocks until the peer unpins
            assert!(
                released.load(Ordering::SeqCst),
                "revocation waited for the pin"
            );
            assert_eq!(
                board.pin_peers::<i64>(1, 3, 1024, true).err(),
                Some(0),
                "gone once revoked"
            );
        });
        assert_eq!(buf[1023], 42, "the peer's write is visible to the owner");
    }
}
