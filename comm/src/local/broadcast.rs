//! Broadcast: the root hands every other rank one shared immutable copy of its buffer.

use std::sync::Arc;

use super::lane::{protocol, Body, Lane};
use crate::error::Result;
use crate::stats::OpKind;

pub(super) fn broadcast(l: &mut Lane, buf: &mut [f32], root: usize) -> Result<()> {
    let (n, r, len) = (l.size, l.rank, buf.len());
    let kind = OpKind::Broadcast;
    if r == root {
        if n > 1 {
            let shared = Arc::new(buf.to_vec());
            for p in (0..n).filter(|&p| p != r) {
                l.send(p, kind, len, Body::SharedF32(Arc::clone(&shared)))?;
            }
        }
        return Ok(());
    }
    match l.recv(root, kind, Some(len))? {
        Body::SharedF32(v) if v.len() == len => buf.copy_from_slice(&v),
        _ => return Err(protocol(kind, root)),
    }
    Ok(())
}

pub(super) fn broadcast_bytes(l: &mut Lane, buf: &mut Vec<u8>, root: usize) -> Result<()> {
    let (n, r) = (l.size, l.rank);
    let kind = OpKind::Broadcast;
    if r == root {
        if n > 1 {
            let shared = Arc::new(buf.clone());
            for p in (0..n).filter(|&p| p != r) {
                l.send(p, kind, buf.len(), Body::SharedBytes(Arc::clone(&shared)))?;
            }
        }
        return Ok(());
    }
    match l.recv(root, kind, None)? {
        Body::SharedBytes(v) => {
            buf.clear();
            buf.extend_from_slice(&v);
        }
        _ => return Err(protocol(kind, root)),
    }
    Ok(())
}
