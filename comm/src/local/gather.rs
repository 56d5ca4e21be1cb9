//! All-gather, ragged all-gather and the word gather behind `split`: one hop, every payload
//! shared with all receivers as one immutable copy (`Arc`), the fastest schedule in shared
//! memory.

use std::sync::Arc;

use super::lane::{protocol, Body, Lane};
use crate::error::{CommError, Result};
use crate::stats::OpKind;

pub(super) fn all_gather(l: &mut Lane, input: &[f32], output: &mut [f32]) -> Result<()> {
    let (n, r, len) = (l.size, l.rank, input.len());
    if output.len() != n * len {
        return Err(CommError::BadLength {
            op: OpKind::AllGather,
            what: "output",
            expected: n * len,
            got: output.len(),
        });
    }
    output[r * len..(r + 1) * len].copy_from_slice(input);
    if n == 1 {
        return Ok(());
    }
    let shared = Arc::new(input.to_vec());
    for p in (0..n).filter(|&p| p != r) {
        l.send(
            p,
            OpKind::AllGather,
            len,
            Body::SharedF32(Arc::clone(&shared)),
        )?;
    }
    // Receive from everyone before judging lengths, so that every rank reports the same
    // mismatch (rank 0 against the first rank that differs from it).
    let mut got: Vec<(usize, Arc<Vec<f32>>)> = Vec::with_capacity(n - 1);
    for p in (0..n).filter(|&p| p != r) {
        match l.recv(p, OpKind::AllGather, None)? {
            Body::SharedF32(v) => got.push((p, v)),
            _ => return Err(protocol(OpKind::AllGather, p)),
        }
    }
    let len_of = |q: usize| -> usize {
        if q == r {
            len
        } else {
            got.iter()
                .find(|(p, _)| *p == q)
                .map_or(0, |(_, v)| v.len())
        }
    };
    if let Some(q) = (1..n).find(|&q| len_of(q) != len_of(0)) {
        return Err(CommError::SizeMismatch {
            op: OpKind::AllGather,
            rank: 0,
            len: len_of(0),
            peer: q,
            peer_len: len_of(q),
        });
    }
    for (p, v) in got {
        output[p * len..(p + 1) * len].copy_from_slice(&v);
    }
    Ok(())
}

pub(super) fn all_gatherv_bytes(l: &mut Lane, input: &[u8]) -> Result<Vec<Vec<u8>>> {
    let (n, r) = (l.size, l.rank);
    let kind = OpKind::AllGatherV;
    if n > 1 {
        let shared = Arc::new(input.to_vec());
        for p in (0..n).filter(|&p| p != r) {
            l.send(p, kind, input.len(), Body::SharedBytes(Arc::clone(&shared)))?;
        }
    }
    let mut out = Vec::with_capacity(n);
    for p in 0..n {
        if p == r {
            out.push(input.to_vec());
        } else {
            match l.recv(p, kind, None)? {
                // The last holder of the payload takes it without a copy.
                Body::SharedBytes(v) => {
                    out.push(Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone()))
                }
                _ => return Err(protocol(kind, p)),
            }
        }
    }
    Ok(out)
}

/// Every rank's `words` (same count on all ranks), for `split`'s color and key exchange.
pub(super) fn gather_words(l: &mut Lane, words: Vec<u64>) -> Result<Vec<Vec<u64>>> {
    let (n, r) = (l.size, l.rank);
    for p in (0..n).filter(|&p| p != r) {
        l.send(p, OpKind::Split, words.len(), Body::Words(words.clone()))?;
    }
    let mut out = Vec::with_capacity(n);
    for p in 0..n {
        if p == r {
            out.push(words.clone());
        } else {
            match l.recv(p, OpKind::Split, Some(words.len()))? {
                Body::Words(w) => out.push(w),
                _ => return Err(protocol(OpKind::Split, p)),
            }
        }
    }
    Ok(out)
}
