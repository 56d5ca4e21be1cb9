//! ZeRO's shard-major layouts: how a list of parameter buffers is laid out so that one
//! reduce-scatter leaves every DP rank exactly its shard of each (ZeRO-2's gradient
//! buckets), and one all-gather hands every rank the others' updated shards (the parameter
//! all-gather after the sharded AdamW step of ZeRO-1 and 2).
//!
//! Every parameter is sharded on its own by [`zero_shard`] (FSDP2's per-parameter split):
//! rank `r` owns `ceil(len / n)` elements starting at `r · ceil(len / n)`. In the
//! shard-major layout rank `r`'s block holds its shard of every parameter in order, each
//! padded to that stride, so all blocks have one length and the collectives need no counts.

use meshrec_pipeline::{zero_shard, zero_shard_stride};

use crate::error::ParallelError;

/// The shard-major layout of parameters of the given lengths over `size` DP ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    lens: Vec<usize>,
    size: usize,
    /// Each parameter's offset inside a rank's block.
    offsets: Vec<usize>,
    block: usize,
}

impl ShardLayout {
    pub fn new(lens: impl IntoIterator<Item = usize>, size: usize) -> Self {
        let size = size.max(1);
        let lens: Vec<usize> = lens.into_iter().collect();
        let mut offsets = Vec::with_capacity(lens.len());
        let mut block = 0;
        for &len in &lens {
            offsets.push(block);
            block += zero_shard_stride(len, size);
        }
        Self {
            lens,
            size,
            offsets,
            block,
        }
    }

    /// Elements of one rank's block (its padded shards of every parameter).
    pub fn block_len(&self) -> usize {
        self.block
    }

    /// Elements of the whole layout: `size` blocks.
    pub fn total_len(&self) -> usize {
        self.block * self.size
    }

    fn check(&self, what: &str, got: usize) -> Result<(), ParallelError> {
        if got != self.lens.len() {
            return Err(ParallelError::State(format!(
                "ZeRO {what}: {got} parameters where the layout has {}",
                self.lens.len()
            )));
        }
        Ok(())
    }

    /// Every rank's shards of the full buffers `full`, shard-major: what a reduce-scatter
    /// takes.
    pub fn pack_all<'a>(
        &self,
        full: impl ExactSizeIterator<Item = &'a [f32]>,
    ) -> Result<Vec<f32>, ParallelError> {
        self.check("pack", full.len())?;
        let mut out = vec![0.0f32; self.total_len()];
        for (i, buf) in full.enumerate() {
            if buf.len() != self.lens[i] {
                return Err(ParallelError::State(format!(
                    "ZeRO pack: parameter {i} has {} values, the layout {}",
                    buf.len(),
                    self.lens[i]
                )));
            }
            for r in 0..self.size {
                let shard = zero_shard(buf.len(), self.size, r);
                let at = r * self.block + self.offsets[i];
                out[at..at + shard.len()].copy_from_slice(&buf[shard]);
            }
        }
        Ok(out)
    }

    /// Rank `rank`'s block from its shards of each parameter (each `zero_shard` long):
    /// what it contributes to the all-gather.
    pub fn pack_block<'a>(
        &self,
        rank: usize,
        shards: impl ExactSizeIterator<Item = &'a [f32]>,
    ) -> Result<Vec<f32>, ParallelError> {
        self.check("pack", shards.len())?;
        let mut out = vec![0.0f32; self.block];
        for (i, shard) in shards.enumerate() {
            let want = zero_shard(self.lens[i], self.size, rank).len();
            if shard.len() != want {
                return Err(ParallelError::State(format!(
                    "ZeRO pack: rank {rank}'s shard of parameter {i} has {} values, not {want}",
                    shard.len()
                )));
            }
            out[self.offsets[i]..self.offsets[i] + want].copy_from_slice(shard);
        }
        Ok(out)
    }

    /// Rank `rank`'s shard of parameter `param` inside its block.
    pub fn shard_of<'a>(&self, block: &'a [f32], rank: usize, param: usize) -> &'a [f32] {
        let n = zero_shard(self.lens[param], self.size, rank).len();
        &block[self.offsets[param]..self.offsets[param] + n]
    }

    /// Writes every rank's shards from an all-gathered shard-major buffer into the full
    /// buffers.
    pub fn unpack_all(
        &self,
        gathered: &[f32],
        full: &mut [&mut [f32]],
    ) -> Result<(), ParallelError> {
        self.check("unpack", full.len())?;
        if gathered.len() != self.total_len() {
            return Err(ParallelError::State(format!(
                "ZeRO unpack: {} values gathered, the layout has {}",
                gathered.len(),
                self.total_len()
            )));
        }
        for (i, buf) in full.iter_mut().enumerate() {
            if buf.len() != self.lens[i] {
                return Err(ParallelError::State(format!(
                    "ZeRO unpack: parameter {i} has {} values, the layout {}",
                    buf.len(),
                    self.lens[i]
                )));
            }
            for r in 0..self.size {
                let block = &gathered[r * self.block..(r + 1) * self.block];
                let shard = zero_shard(self.lens[i], self.size, r);
                buf[shard].copy_from_slice(self.shard_of(block, r, i));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reduce-scatter of the packed layout by hand (sum over ranks, block `r` to rank
    /// `r`) leaves each rank its shard of every reduced parameter; gathering the blocks
    /// rebuilds the full buffers.
    #[test]
    fn packed_blocks_are_each_ranks_shards() {
        let lens = [5usize, 1, 8, 0, 3];
        let size = 3;
        let layout = ShardLayout::new(lens, size);
        let ranks: Vec<Vec<Vec<f32>>> = (0..size)
            .map(|r| {
                lens.iter()
                    .enumerate()
                    .map(|(p, &n)| (0..n).map(|j| (100 * r + 10 * p + j) as f32).collect())
                    .collect()
            })
            .collect();
        let packed: Vec<Vec<f32>> = ranks
            .iter()
            .map(|bufs| layout.pack_all(bufs.iter().map(Vec::as_slice)).unwrap())
            .collect();
        let sum: Vec<f32> = (0..layout.total_len())
            .map(|k| packed.iter().map(|p| p[k]).sum())
            .collect();
        let mut blocks = Vec::new();
        for r in 0..size {
            let block = &sum[r * layout.block_len()..(r + 1) * layout.block_len()];
            for (p, &n) in lens.iter().enumerate() {
                let shard = zero_shard(n, size, r);
                let want: Vec<f32> = shard
                    .clone()
                    .map(|j| ranks.iter().map(|b| b[p][j]).sum())
                    .collect();
                assert_eq!(layout.shard_of(block, r, p), want.as_slice());
            }
            let shards: Vec<&[f32]> = (0..lens.len())
                .map(|p| layout.shard_of(block, r, p))
                .collect();
            blocks.extend(layout.pack_block(r, shards.into_iter()).unwrap());
        }
        let mut full: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
        let mut views: Vec<&mut [f32]> = full.iter_mut().map(Vec::as_mut_slice).collect();
        layout.unpack_all(&blocks, &mut views).unwrap();
        for (p, buf) in full.iter().enumerate() {
            let want: Vec<f32> = (0..lens[p])
                .map(|j| ranks.iter().map(|b| b[p][j]).sum())
                .collect();
            assert_eq!(buf, &want);
        }
    }

    #[test]
    fn a_wrong_parameter_count_or_size_is_named() {
        let layout = ShardLayout::new([4, 4], 2);
        let one = [vec![0.0f32; 4]];
        let err = layout.pack_all(one.iter().map(Vec::as_slice)).unwrap_err();
        assert!(err.to_string().contains("1 parameters"), "{err}");
        let bad = [vec![0.0f32; 4], vec![0.0; 3]];
        let err = layout.pack_all(bad.iter().map(Vec::as_slice)).unwrap_err();
        assert!(err.to_string().contains("parameter 1 has 3"), "{err}");
    }
}
