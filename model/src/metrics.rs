//! Full-ranking metrics (HR, NDCG, MRR at K = 5, 10, 20) for leave-one-out evaluation.

use std::collections::BTreeMap;

/// The cut-offs every report carries.
pub const CUTOFFS: [usize; 3] = [5, 10, 20];

/// 1-based rank of `target` among the candidate items `1..scores.len()` (index 0 is padding
/// and never ranked). Items in `exclude` (the user's history) are not candidates, except the
/// target itself. Ties count against the target: an item scoring exactly the target's
/// score ranks above it, so a model that scores everything alike gets the worst rank,
/// not the best.
pub fn rank_of_target(scores: &[f32], target: u32, exclude: &[u32]) -> usize {
    let t = target as usize;
    let target_score = scores[t];
    if target_score.is_nan() {
        return scores.len().saturating_sub(1).max(1);
    }
    let mut above = 0usize;
    for (i, &s) in scores.iter().enumerate().skip(1) {
        if i != t && s >= target_score {
            above += 1;
        }
    }
    // Remove the excluded items that were counted above the target.
    let mut seen = Vec::with_capacity(exclude.len());
    for &e in exclude {
        let e = e as usize;
        if e != 0 && e != t && e < scores.len() && scores[e] >= target_score && !seen.contains(&e) {
            seen.push(e);
            above -= 1;
        }
    }
    above + 1
}

/// [`rank_of_target`] split over vocabulary shards: `scores` covers the items
/// `first_item .. first_item + scores.len()` and `target_score` is the target's score
/// (agreed across shards). Returns how many of this shard's candidates rank above the
/// target (ties against it), padding, target and history excluded. The rank is the sum over
/// shards plus one; with a NaN target score every candidate counts, so the sum matches
/// the unsharded worst rank.
pub fn above_target_on_shard(
    scores: &[f32],
    first_item: u32,
    target: u32,
    target_score: f32,
    exclude: &[u32],
) -> usize {
    let first = first_item as usize;
    let t = target as usize;
    let is_candidate = |global: usize| global != 0 && global != t;
    let beats = |s: f32| target_score.is_nan() || s >= target_score;
    let mut above = scores
        .iter()
        .enumerate()
        .filter(|&(i, &s)| is_candidate(first + i) && beats(s))
        .count();
    let mut seen = Vec::with_capacity(exclude.len());
    for &e in exclude {
        let e = e as usize;
        if let Some(&s) = e.checked_sub(first).and_then(|local| scores.get(local)) {
            if is_candidate(e) && beats(s) && !seen.contains(&e) {
                seen.push(e);
                above -= 1;
            }
        }
    }
    above
}

/// Sums of per-user metrics; `report` divides by the number of users.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankingMetrics {
    pub users: usize,
    hr: [f64; CUTOFFS.len()],
    ndcg: [f64; CUTOFFS.len()],
    mrr: [f64; CUTOFFS.len()],
}

impl RankingMetrics {
    pub fn add_rank(&mut self, rank: usize) {
        self.users += 1;
        for (k_idx, &k) in CUTOFFS.iter().enumerate() {
            if rank <= k {
                self.hr[k_idx] += 1.0;
                self.ndcg[k_idx] += 1.0 / ((rank + 1) as f64).log2();
                self.mrr[k_idx] += 1.0 / rank as f64;
            }
        }
    }

    /// Adds partial sums from another shard of users (data-parallel evaluation).
    pub fn merge(&mut self, other: &RankingMetrics) {
        self.users += other.users;
        for i in 0..CUTOFFS.len() {
            self.hr[i] += other.hr[i];
            self.ndcg[i] += other.ndcg[i];
            self.mrr[i] += other.mrr[i];
        }
    }

    /// `{"hr@5": .., "ndcg@5": .., "mrr@5": .., ... @10, @20}` averaged over users.
    pub fn report(&self) -> BTreeMap<String, f64> {
        let n = self.users.max(1) as f64;
        let mut out = BTreeMap::new();
        for (i, k) in CUTOFFS.iter().enumerate() {
            out.insert(format!("hr@{k}"), self.hr[i] / n);
            out.insert(format!("ndcg@{k}"), self.ndcg[i] / n);
            out.insert(format!("mrr@{k}"), self.mrr[i] / n);
        }
        out
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.report().get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_strictly_better_and_ties_against_target() {
        // index 0 = padding (score ignored even though it is the largest)
        let scores = [100.0, 0.5, 0.9, 0.5, 0.1];
        assert_eq!(rank_of_target(&scores, 2, &[]), 1);
        // target 1 (0.5): item 2 is better, item 3 ties -> rank 3
        assert_eq!(rank_of_target(&scores, 1, &[]), 3);
        assert_eq!(rank_of_target(&scores, 4, &[]), 4);
    }

    #[test]
    fn history_is_excluded_but_never_the_target() {
        let scores = [0.0, 0.5, 0.9, 0.5, 0.1];
        // excluding item 2 and 3 leaves the target first
        assert_eq!(rank_of_target(&scores, 1, &[2, 3, 3, 1]), 1);
        // a history item scoring below the target changes nothing
        assert_eq!(rank_of_target(&scores, 1, &[4]), 3);
    }

    #[test]
    fn shard_counts_sum_to_the_full_rank() {
        let scores: Vec<f32> = (0..23).map(|i| ((i * 37 % 11) as f32) * 0.5).collect();
        for target in 1..23u32 {
            let history = [3, 5, 5, target, 17, 22];
            let full = rank_of_target(&scores, target, &history);
            for shards in 1..=4 {
                let sum: usize = (0..shards)
                    .map(|k| {
                        let r = k * scores.len() / shards..(k + 1) * scores.len() / shards;
                        above_target_on_shard(
                            &scores[r.clone()],
                            r.start as u32,
                            target,
                            scores[target as usize],
                            &history,
                        )
                    })
                    .sum();
                assert_eq!(sum + 1, full, "target {target}, {shards} shards");
            }
        }
        let nan = [0.0, 1.0, f32::NAN, 2.0];
        assert_eq!(
            above_target_on_shard(&nan, 0, 2, f32::NAN, &[]) + 1,
            rank_of_target(&nan, 2, &[])
        );
    }

    #[test]
    fn constant_scores_rank_last() {
        let scores = [0.0; 11];
        assert_eq!(rank_of_target(&scores, 3, &[]), 10);
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        let mut m = RankingMetrics::default();
        for rank in [1, 3, 7, 12, 30] {
            m.add_rank(rank);
        }
        let r = m.report();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        close(r["hr@5"], 2.0 / 5.0);
        close(r["hr@10"], 3.0 / 5.0);
        close(r["hr@20"], 4.0 / 5.0);
        let d = |rank: f64| 1.0 / (rank + 1.0).log2();
        close(r["ndcg@5"], (d(1.0) + d(3.0)) / 5.0);
        close(r["ndcg@10"], (d(1.0) + d(3.0) + d(7.0)) / 5.0);
        close(r["ndcg@20"], (d(1.0) + d(3.0) + d(7.0) + d(12.0)) / 5.0);
        close(r["mrr@5"], (1.0 + 1.0 / 3.0) / 5.0);
        close(r["mrr@10"], (1.0 + 1.0 / 3.0 + 1.0 / 7.0) / 5.0);
        close(
            r["mrr@20"],
            (1.0 + 1.0 / 3.0 + 1.0 / 7.0 + 1.0 / 12.0) / 5.0,
        );
    }

    #[test]
    fn merge_equals_single_pass() {
        let mut a = RankingMetrics::default();
        let mut b = RankingMetrics::default();
        let mut all = RankingMetrics::default();
        for (i, rank) in [1, 2, 9, 15, 40, 4].into_iter().enumerate() {
            if i % 2 == 0 {
                a.add_rank(rank)
            } else {
                b.add_rank(rank)
            }
            all.add_rank(rank);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }
}
