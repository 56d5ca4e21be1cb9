//! Sequence parallelism's shard of the residual stream: which rows of the sequence a TP
//! rank holds, and the all-gather and reduce-scatter along the sequence that replace the
//! TP all-reduces (Megatron's `g` and `ḡ`).

use burn::tensor::{Tensor, TensorData};
use meshrec_comm::{Communicator, ReduceOp};
use meshrec_model::params::to_host as host;

use crate::error::ParallelError;

/// This rank's share of the sequence under sequence parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeqShard {
    pub(crate) rank: usize,
    pub(crate) size: usize,
}

impl SeqShard {
    /// The first position of this rank's rows in a sequence of `seq` positions.
    pub(crate) fn offset(&self, seq: usize) -> usize {
        self.rank * seq / self.size
    }

    /// This rank's rows of a whole-sequence tensor (`[b, seq, d]`).
    pub(crate) fn rows(&self, t: Tensor<3>) -> Tensor<3> {
        let s = t.dims()[1];
        t.narrow(1, self.offset(s), s / self.size)
    }

    /// Every rank's rows gathered into the whole sequence (`[b, s/tp, d]` -> `[b, s, d]`):
    /// Megatron's `g` in forward, the backward of a reduce-scatter.
    pub(crate) fn gather(
        &self,
        t: Tensor<3>,
        tp: &dyn Communicator,
    ) -> Result<Tensor<3>, ParallelError> {
        let [b, rows, d] = t.dims();
        let device = t.device();
        let mine = host(t);
        let mut all = vec![0.0f32; mine.len() * self.size];
        tp.all_gather(&mine, &mut all)?;
        // Rank-major [tp][b][rows][d] to [b][tp·rows][d].
        let (row, block) = (rows * d, rows * d * b);
        let mut out = vec![0.0f32; all.len()];
        for r in 0..self.size {
            for i in 0..b {
                let src = r * block + i * row;
                let dst = i * row * self.size + r * row;
                out[dst..dst + row].copy_from_slice(&all[src..src + row]);
            }
        }
        Ok(meshrec_model::transfer::upload(
            TensorData::new(out, [b, rows * self.size, d]),
            &device,
        ))
    }

    /// The sum over the TP group of a whole-sequence tensor, keeping this rank's rows
    /// (`[b, s, d]` -> `[b, s/tp, d]`): the reduce-scatter that replaces an all-reduce.
    pub(crate) fn scatter(
        &self,
        t: Tensor<3>,
        tp: &dyn Communicator,
    ) -> Result<Tensor<3>, ParallelError> {
        let [b, s, d] = t.dims();
        let device = t.device();
        let whole = host(t);
        let rows = s / self.size;
        let (row, block) = (rows * d, rows * d * b);
        // [b][tp·rows][d] to rank-major [tp][b][rows][d].
        let mut ordered = vec![0.0f32; whole.len()];
        for r in 0..self.size {
            for i in 0..b {
                let src = i * row * self.size + r * row;
                let dst = r * block + i * row;
                ordered[dst..dst + row].copy_from_slice(&whole[src..src + row]);
            }
        }
        let mut mine = vec![0.0f32; block];
        tp.reduce_scatter(&ordered, &mut mine, ReduceOp::Sum)?;
        Ok(meshrec_model::transfer::upload(
            TensorData::new(mine, [b, rows, d]),
            &device,
        ))
    }
}
