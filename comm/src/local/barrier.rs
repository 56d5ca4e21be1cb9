//! The dissemination barrier: `ceil(log2 n)` rounds of empty messages, no central rank.

use super::lane::{Body, Lane};
use crate::error::Result;
use crate::stats::OpKind;

/// In round `k` send to `r + 2^k`, receive from `r - 2^k`.
pub(super) fn barrier(l: &mut Lane) -> Result<()> {
    let (n, r) = (l.size, l.rank);
    let mut d = 1;
    while d < n {
        l.send((r + d) % n, OpKind::Barrier, 0, Body::Empty)?;
        l.recv((r + n - d) % n, OpKind::Barrier, None)?;
        d <<= 1;
    }
    Ok(())
}
