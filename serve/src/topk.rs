//! The k best items of one score row by partial selection (`select_nth_unstable_by`, then a
//! sort of the k alone), never a full sort of the catalogue.

use std::cmp::Ordering;

/// One recommended item: its dense id and score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub item: u32,
    pub score: f32,
}

/// The serving order: higher score first, the lower id first among equal scores (a fixed
/// order, so a ranking is reproducible); NaN ranks below everything.
pub fn order(a: &Scored, b: &Scored) -> Ordering {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    key(b.score)
        .total_cmp(&key(a.score))
        .then(a.item.cmp(&b.item))
}

/// The `k` best candidates of `scores` (index = dense item id; index 0, padding, is never a
/// candidate), leaving out the items of `exclude`, best first.
pub fn top_k(scores: &[f32], k: usize, exclude: &[u32]) -> Vec<Scored> {
    let mut excluded = vec![false; scores.len()];
    for &e in exclude {
        if let Some(slot) = excluded.get_mut(e as usize) {
            *slot = true;
        }
    }
    let mut candidates: Vec<Scored> = scores
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(i, _)| !excluded[*i])
        .map(|(i, &score)| Scored {
            item: i as u32,
            score,
        })
        .collect();
    let k = k.min(candidates.len());
    if k == 0 {
        return Vec::new();
    }
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, order);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(order);
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_sort(scores: &[f32], k: usize, exclude: &[u32]) -> Vec<Scored> {
        let mut all: Vec<Scored> = (1..scores.len())
            .filter(|i| !exclude.contains(&(*i as u32)))
            .map(|i| Scored {
                item: i as u32,
                score: scores[i],
            })
            .collect();
        all.sort_by(order);
        all.truncate(k);
        all
    }

    #[test]
    fn partial_selection_equals_a_full_sort() {
        for seed in 0..50u32 {
            let n = 5 + (seed as usize * 7) % 40;
            // Coarse values so that ties occur.
            let scores: Vec<f32> = (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2_654_435_761u32).wrapping_add(seed)) % 13) as f32
                        * 0.5
                })
                .collect();
            let exclude: Vec<u32> = (0..n as u32).filter(|i| (i + seed) % 4 == 0).collect();
            for k in [1, 3, 10, n] {
                assert_eq!(top_k(&scores, k, &exclude), full_sort(&scores, k, &exclude));
            }
        }
    }

    #[test]
    fn padding_nan_and_exclusions() {
        let scores = [9.0, f32::NAN, 1.0, 3.0, 2.0];
        let top = top_k(&scores, 10, &[3, 3, 99]);
        let items: Vec<u32> = top.iter().map(|s| s.item).collect();
        assert_eq!(items, vec![4, 2, 1]);
        assert!(top_k(&scores, 0, &[]).is_empty());
    }
}
