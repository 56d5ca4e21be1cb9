//! The serving configuration: one TOML file (sections `[batching] [workers] [autoscale]
//! [model] [limits]`), every field defaulted, unknown keys rejected, `--set
//! section.key=value` overrides. The defaults are the plain baseline: no batching, fp32,
//! one worker, no autoscaling.

use std::cmp::Ordering;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ServeError;

/// Dynamic batching: requests queue, and a batch closes when it holds `max_batch` requests
/// or its first request has waited `max_delay_us`. `max_batch = 1` turns batching off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSection {
    pub max_batch: usize,
    pub max_delay_us: u64,
}

impl Default for BatchingSection {
    fn default() -> Self {
        Self {
            max_batch: 1,
            max_delay_us: 0,
        }
    }
}

/// The worker replicas: one per entry of `devices` (`cpu`, `wgpu`, `cuda:N`), each a thread
/// with its own copy of the model on its device. Between `min_workers` and `max_workers`
/// of them take batches; the autoscaler moves the number within those bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSection {
    pub devices: Vec<String>,
    pub min_workers: usize,
    pub max_workers: usize,
    /// Batches a worker may hold (running plus waiting) before the dispatcher passes it
    /// over.
    pub max_inflight: usize,
}

impl Default for WorkersSection {
    fn default() -> Self {
        Self {
            devices: vec!["cpu".into()],
            min_workers: 1,
            max_workers: 1,
            max_inflight: 2,
        }
    }
}

/// The autoscaler: every `tick_ms` it compares the queue depth per active worker and the
/// recent p95 latency with their targets; `up_after` ticks in a row over them add a worker,
/// `down_after` ticks in a row well under them remove one, and no change follows another
/// within `cooldown_ms` (hysteresis: the bands and the counts keep it from oscillating).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleSection {
    pub enabled: bool,
    pub tick_ms: u64,
    pub target_p95_ms: f64,
    pub up_queue_per_worker: f64,
    pub down_queue_per_worker: f64,
    /// Scale down only when p95 is under this fraction of the target.
    pub down_latency_ratio: f64,
    pub up_after: u32,
    pub down_after: u32,
    pub cooldown_ms: u64,
}

impl Default for AutoscaleSection {
    fn default() -> Self {
        Self {
            enabled: false,
            tick_ms: 100,
            target_p95_ms: 25.0,
            up_queue_per_worker: 4.0,
            down_queue_per_worker: 0.5,
            down_latency_ratio: 0.5,
            up_after: 2,
            down_after: 10,
            cooldown_ms: 500,
        }
    }
}

/// How the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernels {
    /// burn's forward, exactly as offline evaluation runs it.
    Burn,
    /// meshrec's host forward on slices (last position only in the last block).
    Host,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub kernels: Kernels,
    /// Per-row symmetric int8 item table for scoring and per-channel int8 weights in the
    /// blocks (implies the host kernels: burn's Flex backend has no int8 matmul).
    pub int8: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            kernels: Kernels::Burn,
            int8: false,
        }
    }
}

/// What the front refuses before it reaches the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Request bodies above this many bytes get 413.
    pub max_body_bytes: usize,
    /// Requests waiting for a batch above this many get 503 with Retry-After.
    pub max_queue: usize,
    /// Items of a history above this many get 400 (the model reads the last `max_len`).
    pub max_history: usize,
    /// Seconds a client is told to wait when the queue is full.
    pub retry_after_s: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_queue: 1024,
            max_history: 5000,
            retry_after_s: 1,
        }
    }
}

/// The whole serving configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub batching: BatchingSection,
    pub workers: WorkersSection,
    pub autoscale: AutoscaleSection,
    pub model: ModelSection,
    pub limits: LimitsSection,
}

/// Parses a `--set` value as a TOML value, falling back to a plain string.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

impl ServeConfig {
    /// Reads `path` (if any), applies the overrides, and checks every value.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ServeError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| ServeError::io(p, e))?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_string()),
        };
        Self::from_toml(&text, &origin, overrides)
    }

    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Self, ServeError> {
        let parse_error = |e: &dyn std::fmt::Display| ServeError::Config {
            origin: origin.into(),
            message: e.to_string(),
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_error(&e))?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| ServeError::BadOverride(o.clone()))?;
            let parts: Vec<&str> = key.trim().split('.').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(ServeError::BadOverride(o.clone()));
            }
            let section = table
                .entry(parts[0].to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| ServeError::BadOverride(o.clone()))?;
            section.insert(parts[1].to_string(), parse_value(value.trim()));
        }
        let config: ServeConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(&e))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ServeError> {
        let w = &self.workers;
        if self.batching.max_batch == 0 {
            return Err(ServeError::invalid(
                "batching.max_batch",
                "must be at least 1",
            ));
        }
        if w.devices.is_empty() {
            return Err(ServeError::invalid(
                "workers.devices",
                "name at least one device",
            ));
        }
        if w.min_workers == 0 || w.min_workers > w.max_workers {
            return Err(ServeError::invalid(
                "workers.min_workers",
                format!(
                    "need 1 <= min_workers ({}) <= max_workers ({})",
                    w.min_workers, w.max_workers
                ),
            ));
        }
        if w.max_workers > w.devices.len() {
            return Err(ServeError::invalid(
                "workers.max_workers",
                format!(
                    "{} workers need as many entries in workers.devices (it has {}); repeat a \
                     device for several replicas on it",
                    w.max_workers,
                    w.devices.len()
                ),
            ));
        }
        if w.max_inflight == 0 {
            return Err(ServeError::invalid(
                "workers.max_inflight",
                "must be at least 1",
            ));
        }
        let a = &self.autoscale;
        if a.tick_ms == 0 || a.target_p95_ms.partial_cmp(&0.0) != Some(Ordering::Greater) {
            return Err(ServeError::invalid(
                "autoscale.tick_ms",
                "tick_ms and target_p95_ms must be positive",
            ));
        }
        if a.down_queue_per_worker.partial_cmp(&a.up_queue_per_worker) != Some(Ordering::Less) {
            return Err(ServeError::invalid(
                "autoscale.down_queue_per_worker",
                "must be below up_queue_per_worker (the gap is the hysteresis band)",
            ));
        }
        if !(a.down_latency_ratio > 0.0 && a.down_latency_ratio < 1.0) {
            return Err(ServeError::invalid(
                "autoscale.down_latency_ratio",
                "must be in (0, 1)",
            ));
        }
        if a.up_after == 0 || a.down_after == 0 {
            return Err(ServeError::invalid(
                "autoscale.up_after",
                "up_after and down_after must be at least 1",
            ));
        }
        let l = &self.limits;
        if l.max_body_bytes == 0 || l.max_queue == 0 || l.max_history == 0 {
            return Err(ServeError::invalid(
                "limits.max_queue",
                "max_body_bytes, max_queue and max_history must be at least 1",
            ));
        }
        Ok(())
    }

    /// A short label of what is switched on, for logs and the `model` field.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if self.batching.max_batch > 1 {
            parts.push(format!(
                "batch{}/{}us",
                self.batching.max_batch, self.batching.max_delay_us
            ));
        }
        if self.model.int8 {
            parts.push("int8".into());
        } else if self.model.kernels == Kernels::Host {
            parts.push("host".into());
        }
        if self.workers.max_workers > 1 {
            parts.push(format!(
                "workers{}-{}{}",
                self.workers.min_workers,
                self.workers.max_workers,
                if self.autoscale.enabled { "auto" } else { "" }
            ));
        }
        if parts.is_empty() {
            "fp32".into()
        } else {
            parts.join("+")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_baseline_and_overrides_apply() {
        let c = ServeConfig::from_toml("", "t", &[]).unwrap();
        assert_eq!(c.batching.max_batch, 1);
        assert_eq!(c.workers.max_workers, 1);
        assert!(!c.model.int8);
        let c = ServeConfig::from_toml(
            "[batching]\nmax_batch = 8\n",
            "t",
            &["model.int8=true".into(), "batching.max_delay_us=500".into()],
        )
        .unwrap();
        assert_eq!((c.batching.max_batch, c.batching.max_delay_us), (8, 500));
        assert!(c.model.int8);
    }

    #[test]
    fn the_shipped_configs_parse() {
        let base =
            ServeConfig::from_toml(include_str!("../configs/baseline.toml"), "baseline", &[])
                .unwrap();
        assert_eq!(base, ServeConfig::default());
        let fast =
            ServeConfig::from_toml(include_str!("../configs/fast.toml"), "fast", &[]).unwrap();
        assert!(fast.model.int8 && fast.autoscale.enabled && fast.batching.max_batch == 32);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = ServeConfig::from_toml("[batching]\nmax_batchh = 2\n", "f.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.toml") && err.contains("max_batchh"),
            "{err}"
        );
        let err = ServeConfig::from_toml("", "t", &["workers.max_workers=3".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("workers.max_workers"), "{err}");
        assert!(ServeConfig::from_toml("", "t", &["nonsense".into()]).is_err());
    }
}
