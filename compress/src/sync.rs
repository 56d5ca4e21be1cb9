//! `sync`: the whole compressed gradient all-reduce for either aggregation kind.

use crate::error::SyncError;
use crate::memory::Memory;
use crate::methods::{Aggregation, Compressor};
use crate::stats::SyncReport;
use crate::wire::{Apply, Payload};
use meshrec_comm::{Communicator, DType, ReduceOp};
use std::time::{Duration, Instant};

/// Replaces `grads` (this rank's gradient of one tensor or bucket) with the average
/// over all ranks of the compressed, error-compensated gradients, updating `memory`
/// (residual, warm start, step). Every rank of `comm` must call it with the same
/// method, tensor id and length, in the same order as its other collectives.
///
/// * All-reduce methods run their protocol with `all_reduce(Avg)` (one call; two for
///   PowerSGD).
/// * Gather-then-sum methods exchange payloads with `all_gatherv_bytes`; each rank
///   decodes all of them in rank order, so every rank ends with bit-identical results.
pub fn sync<C: Communicator + ?Sized>(
    comm: &C,
    grads: &mut [f32],
    compressor: &mut dyn Compressor,
    memory: &mut Memory,
) -> Result<SyncReport, SyncError> {
    sync_with(comm, grads, compressor, memory, &mut Payload::new())
}

/// `sync` reusing the caller's payload buffer (hot path: one buffer per bucket stream).
pub fn sync_with<C: Communicator + ?Sized>(
    comm: &C,
    grads: &mut [f32],
    compressor: &mut dyn Compressor,
    memory: &mut Memory,
    payload: &mut Payload,
) -> Result<SyncReport, SyncError> {
    let rank = comm.rank();
    let size = comm.size();
    let method = compressor.method();
    memory.check_method(method)?;
    let start = Instant::now();
    memory.compensate(grads)?;
    let mut report = SyncReport {
        method,
        aggregation: compressor.aggregation(),
        elements: grads.len(),
        dense_bytes: 4 * grads.len(),
        payload_bytes: 0,
        collective_bytes: 0,
        received_bytes: 0,
        skipped: false,
        compress_time: Duration::ZERO,
        decompress_time: Duration::ZERO,
        comm_time: Duration::ZERO,
    };
    let comm_err = |op: &'static str| {
        move |e: meshrec_comm::CommError| SyncError::Comm {
            op,
            rank,
            source: Box::new(e),
        }
    };
    match compressor.aggregation() {
        Aggregation::AllReduce => {
            let mut comm_time = Duration::ZERO;
            let info = {
                let (mut ctx, residual) = memory.ctx_and_residual(rank);
                let mut avg = |buf: &mut [u8], dtype: DType| -> Result<(), SyncError> {
                    let t = Instant::now();
                    let r = comm
                        .all_reduce_bytes(buf, dtype, ReduceOp::Avg)
                        .map_err(comm_err("all_reduce"));
                    comm_time += t.elapsed();
                    r
                };
                compressor.reduce(grads, residual, &mut ctx, &mut avg)?
            };
            report.payload_bytes = info.payload_bytes;
            report.collective_bytes = info.reduced_bytes;
            report.skipped = info.skipped;
            report.comm_time = comm_time;
            report.compress_time = start.elapsed().saturating_sub(comm_time);
        }
        Aggregation::GatherThenSum => {
            {
                let mut ctx = memory.ctx(rank);
                compressor.compress_into(grads, &mut ctx, payload)?;
            }
            memory.absorb(payload, compressor)?;
            report.payload_bytes = payload.wire_len();
            report.collective_bytes = payload.wire_len();
            report.compress_time = start.elapsed();

            let t = Instant::now();
            let parts = comm
                .all_gatherv_bytes(payload.as_bytes())
                .map_err(comm_err("all_gatherv_bytes"))?;
            report.comm_time = t.elapsed();
            if parts.len() != size {
                return Err(SyncError::Mismatch {
                    rank,
                    what: format!(
                        "all_gatherv returned {} payloads for {size} ranks",
                        parts.len()
                    ),
                });
            }

            let t = Instant::now();
            grads.fill(0.0);
            for (from, part) in parts.iter().enumerate() {
                if from != rank {
                    report.received_bytes += part.len();
                }
                compressor
                    .decompress_into(part, grads, Apply::Add)
                    .map_err(|source| SyncError::Peer { from, source })?;
            }
            let n = size as f32;
            for g in grads.iter_mut() {
                *g /= n;
            }
            report.decompress_time = t.elapsed();
        }
    }
    memory.advance();
    Ok(report)
}
