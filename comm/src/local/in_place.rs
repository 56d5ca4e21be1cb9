//! In-place all-reduce and reduce-scatter over shared memory: the engine owns every rank's
//! buffer in one address space, so instead of moving segments through channels each rank
//! publishes its buffer on the lane's [`Board`](super::board::Board) and reduces its own chunk
//! straight from the peers' buffers.
//!
//! All-reduce of `len` elements over `n` ranks, chunked as reduce-scatter is
//! ([`chunk_range`]):
//! 1. every rank publishes its buffer and sends *ready* (with its element type) to every
//!    peer; receiving all of them checks, as every collective of the engine does, that the
//!    peers run the same operation with the same length and type;
//! 2. rank `r` pins the peers' buffers and, block by cache-sized block of chunk `r`, reads
//!    chunk `r` of all `n` buffers, combines them in rank order (`x0 op x1 op ... op x(n-1)`,
//!    divided by `n` at the last step for `Avg`) and writes the result into chunk `r` of all
//!    `n` buffers. Only rank `r` touches chunk `r` of any buffer during this phase, so the
//!    accesses of different ranks are disjoint, and every element is computed once, so all
//!    ranks hold the same bits. Memory traffic: one read of every input and one write of
//!    every output, nothing else;
//! 3. every rank unpins and sends *done* to every peer, and returns once it has received
//!    *done* from all of them: only then may its buffer go back to its caller.
//!
//! Reduce-scatter is the same with read-only inputs: rank `r` reduces chunk `r` of every
//! input into its own output.
//!
//! Failures keep the engine's behaviour: a peer that fails before its *ready* sends an abort
//! (or its channel closes, or the cluster is poisoned, or the wait times out), and nobody
//! touches any buffer; a rank that fails after publishing revokes its buffer when it leaves,
//! which waits for peers that already pinned it to finish their (non-blocking) chunk, and
//! makes the pin of any slower peer fail, which then reports the leaver's error.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;

use super::lane::{protocol, type_mismatch, Body, Lane, Wire};
use crate::communicator::chunk_range;
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::reduce::{combine_final_both, combine_final_into, combine_into, fold_final, Kernel};
use crate::stats::OpKind;

/// Elements per block of the kernels: `n` input blocks and the accumulator stay in L1/L2.
const BLOCK_BYTES: usize = 16 * 1024;

/// In-place all-reduce of `buf` (the group has at least two ranks).
pub(super) fn all_reduce<T: Wire>(l: &mut Lane, buf: &mut [T], op: ReduceOp) -> Result<()> {
    let kind = OpKind::AllReduce;
    let (n, r, len, seq) = (l.size, l.rank, buf.len(), l.seq());
    let board = Arc::clone(&l.board);
    // From here until `mine` drops (on every path), peers may read and write `buf`.
    let mine = board.publish_mut(r, seq, buf);
    handshake::<T>(l, kind, len)?;
    {
        let pins = board
            .pin_peers::<T>(r, seq, len, true)
            .map_err(|q| peer_left(l, kind, q))?;
        let bufs = pins.with_own(r, mine.ptr());
        // SAFETY: `bufs[q]` is rank q's buffer of `len` elements: our own through `mine`, the
        // peers' pinned (so valid until `pins` drops, after this call). The buffers are
        // pairwise disjoint, each being a `&mut` borrow held by a different rank. During
        // this phase only rank `r` touches chunk `r` of any buffer (each rank works on its
        // own chunk, and the owners reach their buffers only through their publications).
        unsafe { reduce_everywhere(&bufs, chunk_range(len, n, r), op) };
    }
    finish(l, kind, len)?;
    debug_assert_eq!(mine.len(), len);
    drop(mine);
    // Bytes between this rank and its peers, each transfer counted by the side it left: it
    // read its chunk of every peer and wrote the result back, and every peer did the same
    // with its chunk of this rank's buffer (2 (n - 1) / n of the buffer each way, as a ring).
    let (own, all) = (
        range_bytes::<T>(n, r, len),
        (len * std::mem::size_of::<T>()) as u64,
    );
    let moved = (n as u64 - 1) * own + (all - own);
    l.count(moved, moved);
    Ok(())
}

/// In-place reduce-scatter: chunk `rank` of the reduced `input` into `output` (already
/// checked to be that chunk's length; the group has at least two ranks).
pub(super) fn reduce_scatter<T: Wire>(
    l: &mut Lane,
    input: &[T],
    output: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let kind = OpKind::ReduceScatter;
    let (n, r, len, seq) = (l.size, l.rank, input.len(), l.seq());
    let range = chunk_range(len, n, r);
    debug_assert_eq!(output.len(), range.len());
    let board = Arc::clone(&l.board);
    let mine = board.publish(r, seq, input);
    handshake::<T>(l, kind, len)?;
    {
        let pins = board
            .pin_peers::<T>(r, seq, len, false)
            .map_err(|q| peer_left(l, kind, q))?;
        let inputs = pins.with_own(r, mine.ptr());
        // SAFETY: `inputs[q]` is rank q's input of `len` elements (our own through `mine`,
        // the peers' pinned until `pins` drops), only ever read during the collective;
        // `output` is this rank's own and not published.
        unsafe { reduce_into(&inputs, range, output, op) };
    }
    finish(l, kind, len)?;
    drop(mine);
    // This rank read its chunk of every peer's input; the peers read theirs of its input.
    let (own, all) = (
        range_bytes::<T>(n, r, len),
        (len * std::mem::size_of::<T>()) as u64,
    );
    l.count(all - own, (n as u64 - 1) * own);
    Ok(())
}

/// Bytes of chunk `r` of a buffer of `len` elements of `T`.
fn range_bytes<T>(n: usize, r: usize, len: usize) -> u64 {
    (chunk_range(len, n, r).len() * std::mem::size_of::<T>()) as u64
}

fn peers(l: &Lane) -> impl Iterator<Item = usize> {
    let (n, r) = (l.size, l.rank);
    (1..n).map(move |k| (r + k) % n)
}

/// Step 1: tells every peer that this rank's buffer is published and waits for all of them,
/// checking operation, length and element type.
fn handshake<T: Wire>(l: &mut Lane, kind: OpKind, len: usize) -> Result<()> {
    for p in peers(l) {
        l.send(p, kind, len, Body::Ready(T::DTYPE))?;
    }
    for p in peers(l) {
        match l.recv(p, kind, Some(len))? {
            Body::Ready(d) if d == T::DTYPE => {}
            Body::Ready(d) => return Err(type_mismatch(kind, l.rank, T::DTYPE, p, d)),
            // A peer running the channel algorithms chose them by byte size, so it reduces
            // another type when its length (checked above) is the same.
            Body::Elems(e) if e.dtype() != T::DTYPE => {
                return Err(type_mismatch(kind, l.rank, T::DTYPE, p, e.dtype()))
            }
            _ => return Err(protocol(kind, p)),
        }
    }
    Ok(())
}

/// Step 3: tells every peer that this rank no longer touches its buffer, and waits until all
/// of them have said the same.
fn finish(l: &mut Lane, kind: OpKind, len: usize) -> Result<()> {
    for p in peers(l) {
        l.send(p, kind, len, Body::Empty)?;
    }
    for p in peers(l) {
        match l.recv(p, kind, Some(len))? {
            Body::Empty => {}
            _ => return Err(protocol(kind, p)),
        }
    }
    Ok(())
}

/// Rank `q` withdrew its buffer before this rank could pin it: it left the operation with an
/// error, and its abort (or a closed channel, the poison, a timeout) is what to report.
fn peer_left(l: &mut Lane, kind: OpKind, q: usize) -> CommError {
    // Its *done* may come first if it failed only while waiting for the others' *done*.
    for _ in 0..2 {
        if let Err(e) = l.recv(q, kind, None) {
            return e;
        }
    }
    CommError::Internal(format!(
        "{kind}: rank {q} left the operation without an error"
    ))
}

fn blocks<T>(range: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let block = (BLOCK_BYTES / std::mem::size_of::<T>().max(1)).max(1);
    range
        .clone()
        .step_by(block)
        .map(move |s| s..(s + block).min(range.end))
}

/// # Safety
/// `p` is valid for reads and writes of `range` (elements), and nothing else accesses those
/// elements while the returned slice lives.
unsafe fn slice_mut<'a, T>(p: NonNull<T>, range: &Range<usize>) -> &'a mut [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(p.as_ptr().add(range.start), range.len()) }
}

/// # Safety
/// `p` is valid for reads of `range` (elements), and nothing writes them while the returned
/// slice lives.
unsafe fn slice<'a, T>(p: NonNull<T>, range: &Range<usize>) -> &'a [T] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(p.as_ptr().add(range.start), range.len()) }
}

/// Reduces `range` of the `bufs` (one per rank, in rank order) and writes the result into
/// `range` of every one of them.
///
/// # Safety
/// Every `bufs[q]` is valid for reads and writes of `range`, the buffers do not overlap, and
/// no other thread accesses `range` of any of them during the call.
unsafe fn reduce_everywhere<T: Kernel>(bufs: &[NonNull<T>], range: Range<usize>, op: ReduceOp) {
    let n = bufs.len();
    let mut acc: Vec<T> = Vec::new();
    for b in blocks::<T>(range) {
        // Each slice below is created, used and dropped before the next one into the same
        // buffer, and slices into different buffers never overlap.
        // SAFETY: the function's contract, on the sub-range `b` of `range`.
        unsafe {
            if n == 2 {
                combine_final_both(slice_mut(bufs[0], &b), slice_mut(bufs[1], &b), op, n);
                continue;
            }
            acc.clear();
            acc.extend_from_slice(slice(bufs[0], &b));
            for &q in &bufs[1..n - 1] {
                combine_into(&mut acc, slice(q, &b), op);
            }
            combine_final_both(&mut acc, slice_mut(bufs[n - 1], &b), op, n);
            for &q in &bufs[..n - 1] {
                slice_mut(q, &b).copy_from_slice(&acc);
            }
        }
    }
}

/// Reduces `range` of the `inputs` (one per rank, in rank order) into `out`.
///
/// # Safety
/// Every `inputs[q]` is valid for reads of `range` and nobody writes it during the call.
unsafe fn reduce_into<T: Kernel>(
    inputs: &[NonNull<T>],
    range: Range<usize>,
    out: &mut [T],
    op: ReduceOp,
) {
    let n = inputs.len();
    let off = range.start;
    for b in blocks::<T>(range) {
        let o = &mut out[b.start - off..b.end - off];
        // SAFETY: the function's contract, on the sub-range `b` of `range`.
        unsafe {
            if n == 2 {
                combine_final_into(o, slice(inputs[0], &b), slice(inputs[1], &b), op, n);
                continue;
            }
            o.copy_from_slice(slice(inputs[0], &b));
            for &q in &inputs[1..n - 1] {
                combine_into(o, slice(q, &b), op);
            }
            fold_final(o, slice(inputs[n - 1], &b), op, n);
        }
    }
}
