//! Full-ranking evaluation on vocabulary shards: each tensor-parallel rank scores the users'
//! hidden states against its rows of the item table only, the target's score is agreed by
//! one all-reduce, and each rank's count of items ranking above the target by another. No
//! rank holds a user's full score row.

use meshrec_comm::{all_reduce_as, Communicator, ReduceOp};
use meshrec_model::loss::{score_into, TableShard};
use meshrec_model::metrics::above_target_on_shard;

use crate::error::ParallelError;

/// 1-based ranks of `targets[i]` for hidden rows `h` (`[n, dim]`, the same on every TP rank)
/// against the shard `table` (rows `first_row ..`), history items excluded. Collective over
/// `tp`.
pub fn rank_on_shards(
    h: &[f32],
    dim: usize,
    table: &[f32],
    first_row: usize,
    targets: &[u32],
    histories: &[Vec<u32>],
    tp: &dyn Communicator,
) -> Result<Vec<usize>, ParallelError> {
    let n = targets.len();
    if h.len() != n * dim || histories.len() != n || !table.len().is_multiple_of(dim.max(1)) {
        return Err(ParallelError::Step(format!(
            "rank_on_shards: {} hidden values, {} targets, {} histories, table of {} values for width {dim}",
            h.len(),
            n,
            histories.len(),
            table.len()
        )));
    }
    let rows = table.len() / dim.max(1);
    let mut scores = vec![0.0f32; n * rows];
    score_into(
        &mut scores,
        h,
        TableShard::new(table, dim, first_row as u32),
    );
    let owned = first_row..first_row + rows;
    let mut target_scores: Vec<f32> = targets
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if owned.contains(&(t as usize)) {
                scores[i * rows + t as usize - first_row]
            } else {
                0.0
            }
        })
        .collect();
    if tp.size() > 1 {
        tp.all_reduce(&mut target_scores, ReduceOp::Sum)?;
    }
    // Counts are summed as integers: exact for any catalogue.
    let mut above: Vec<i64> = (0..n)
        .map(|i| {
            above_target_on_shard(
                &scores[i * rows..(i + 1) * rows],
                first_row as u32,
                targets[i],
                target_scores[i],
                &histories[i],
            ) as i64
        })
        .collect();
    if tp.size() > 1 {
        all_reduce_as(tp, &mut above, ReduceOp::Sum)?;
    }
    Ok(above.into_iter().map(|a| a as usize + 1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshrec_comm::{chunk_range, LocalCluster};
    use meshrec_model::metrics::rank_of_target;

    #[test]
    fn sharded_ranks_equal_full_ranks() {
        let (n, dim, vocab) = (6usize, 4usize, 29usize);
        let h: Vec<f32> = (0..n * dim)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let table: Vec<f32> = (0..vocab * dim)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.2)
            .collect();
        let targets: Vec<u32> = (0..n as u32)
            .map(|i| 1 + (i * 5) % (vocab as u32 - 1))
            .collect();
        let histories: Vec<Vec<u32>> = (0..n as u32)
            .map(|i| vec![1 + i, 2 + 2 * i, targets[i as usize]])
            .collect();
        let mut full = vec![0.0f32; n * vocab];
        score_into(&mut full, &h, TableShard::new(&table, dim, 0));
        let want: Vec<usize> = (0..n)
            .map(|i| rank_of_target(&full[i * vocab..(i + 1) * vocab], targets[i], &histories[i]))
            .collect();
        for tp in 1..=3 {
            let got = LocalCluster::run(tp, |comm| {
                let r = chunk_range(vocab, tp, comm.rank());
                rank_on_shards(
                    &h,
                    dim,
                    &table[r.start * dim..r.end * dim],
                    r.start,
                    &targets,
                    &histories,
                    &comm,
                )
                .unwrap()
            })
            .unwrap();
            for ranks in got {
                assert_eq!(ranks, want, "tp {tp}");
            }
        }
    }
}
