//! What each gradient compressor costs in accuracy: the table `cargo xtask bench
//! convergence` measures (paired seeds, dp 2, the shipped ml-100k recipe) and writes to
//! `balance/data/compression_accuracy.json`, committed so that a fresh clone has it. The
//! planner keeps a lossy compressor only where a measured recipe of it met the bar.

use serde::{Deserialize, Serialize};

use crate::error::BalanceError;

/// One measured compressor recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccuracyEntry {
    /// The simulator's name of the compressor ([`crate::Compression`]'s `name`, e.g.
    /// `topk1%`, `powersgd-r4`).
    pub compression: String,
    /// The recipe measured (the method and its corrections, as the bench names it).
    pub recipe: String,
    /// Mean test NDCG@10 over the seeds, relative to the dense run's.
    pub ndcg_vs_dense: f64,
    /// DP bytes relative to dense.
    pub dp_bytes_ratio: f64,
    pub seeds: Vec<u64>,
}

/// The committed table, with where it came from and the bar it is judged by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccuracyTable {
    /// How and where the figures were measured.
    pub source: String,
    /// Least `ndcg_vs_dense` a compressor must reach to be recommended.
    pub bar: f64,
    pub entries: Vec<AccuracyEntry>,
}

/// What the table says of one compressor.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No compression: nothing to lose.
    Lossless,
    /// A measured recipe met the bar (the best such one).
    Passed(AccuracyEntry),
    /// Measured, and no recipe met the bar (the best one).
    Failed(AccuracyEntry),
    /// Never measured: its accuracy cost is unknown.
    Unmeasured,
}

impl Verdict {
    /// Whether the planner may recommend it without being asked to.
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Lossless | Verdict::Passed(_))
    }
}

/// The table's file as committed.
const COMMITTED: &str = include_str!("../data/compression_accuracy.json");

impl AccuracyTable {
    /// The committed table.
    pub fn committed() -> Result<Self, BalanceError> {
        Self::parse(COMMITTED, "balance/data/compression_accuracy.json")
    }

    /// Parses a table from JSON text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, BalanceError> {
        let table: Self = serde_json::from_str(text).map_err(|e| BalanceError::InvalidLayout {
            layout: origin.to_string(),
            reason: format!("compression accuracy table: {e}"),
        })?;
        if !(table.bar.is_finite() && table.bar > 0.0) {
            return Err(BalanceError::InvalidLayout {
                layout: origin.to_string(),
                reason: format!(
                    "compression accuracy table: bar {} must be positive",
                    table.bar
                ),
            });
        }
        Ok(table)
    }

    /// The verdict on the compressor the simulator calls `name`.
    pub fn verdict(&self, name: &str) -> Verdict {
        if name == "none" {
            return Verdict::Lossless;
        }
        let best = self
            .entries
            .iter()
            .filter(|e| e.compression == name)
            .max_by(|a, b| a.ndcg_vs_dense.total_cmp(&b.ndcg_vs_dense))
            .cloned();
        match best {
            Some(e) if e.ndcg_vs_dense >= self.bar => Verdict::Passed(e),
            Some(e) => Verdict::Failed(e),
            None => Verdict::Unmeasured,
        }
    }

    /// Why the planner leaves `name` out (`None`: it may use it).
    pub fn exclusion(&self, name: &str) -> Option<String> {
        match self.verdict(name) {
            Verdict::Lossless | Verdict::Passed(_) => None,
            Verdict::Failed(e) => Some(format!(
                "{name}: measured {:.3}x the dense NDCG@10 at best ({}, seeds {:?}), below the {:.2}x bar",
                e.ndcg_vs_dense, e.recipe, e.seeds, self.bar
            )),
            Verdict::Unmeasured => Some(format!(
                "{name}: accuracy cost never measured (cargo xtask bench convergence)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> AccuracyTable {
        AccuracyTable::parse(
            r#"{"source": "test", "bar": 0.98, "entries": [
                {"compression": "topk1%", "recipe": "plain", "ndcg_vs_dense": 0.90, "dp_bytes_ratio": 0.02, "seeds": [0]},
                {"compression": "topk1%", "recipe": "dgc", "ndcg_vs_dense": 0.99, "dp_bytes_ratio": 0.02, "seeds": [0]},
                {"compression": "powersgd-r4", "recipe": "per layer", "ndcg_vs_dense": 0.95, "dp_bytes_ratio": 0.1, "seeds": [0]}
            ]}"#,
            "test",
        )
        .unwrap()
    }

    #[test]
    fn the_best_measured_recipe_decides() {
        let t = table();
        assert_eq!(t.verdict("none"), Verdict::Lossless);
        match t.verdict("topk1%") {
            Verdict::Passed(e) => assert_eq!(e.recipe, "dgc"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(t.verdict("powersgd-r4"), Verdict::Failed(_)));
        assert_eq!(t.verdict("qsgd-l15"), Verdict::Unmeasured);
        assert!(t.exclusion("powersgd-r4").unwrap().contains("0.950x"));
        assert!(t.exclusion("qsgd-l15").unwrap().contains("never measured"));
        assert_eq!(t.exclusion("topk1%"), None);
    }

    #[test]
    fn bad_tables_are_errors_naming_the_file() {
        let e = AccuracyTable::parse("{\"source\": \"x\", \"bar\": 0.98}", "f.json").unwrap_err();
        assert!(e.to_string().contains("f.json"), "{e}");
        assert!(AccuracyTable::parse(r#"{"source": "x", "bar": -1, "entries": []}"#, "f").is_err());
        assert!(AccuracyTable::committed().is_ok());
    }
}
