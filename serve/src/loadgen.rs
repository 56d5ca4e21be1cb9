//! The load generator: closed-loop (a fixed number of clients, each sending its next
//! request when the last is answered) or open-loop (Poisson arrivals at a rate, latency
//! counted from each request's scheduled time so a slow server cannot hide its queue),
//! bounded in requests and in time; a load step for the autoscaler; and ranking accuracy
//! measured through the service's own answers. Loopback only: it refuses other hosts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use serde::{Deserialize, Serialize};
use serde_json::json;

use meshrec_model::data::Dataset;

use crate::error::ServeError;
use crate::http::RecommendResponse;
use crate::metrics::scrape_value;

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// `concurrency` clients in a closed loop.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` per second, at most `max_inflight` outstanding (arrivals
    /// beyond that are counted as errors: the client gave up on them).
    Open { rate: f64, max_inflight: usize },
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    pub arrivals: Arrivals,
    /// Stop after this many requests...
    pub requests: usize,
    /// ...or this long, whichever comes first.
    pub duration: Duration,
    pub k: usize,
    pub seed: u64,
}

/// What a load run measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub mode: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub requests: usize,
    pub ok: usize,
    /// Requests without a 200: transport failures, 4xx, 5xx, and open-loop give-ups.
    pub errors: usize,
    /// 5xx answers alone.
    pub server_errors: usize,
    pub statuses: BTreeMap<String, usize>,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub throughput_rps: f64,
    pub wall_s: f64,
}

/// Only loopback targets: a load test never leaves this machine. The host must be
/// `localhost` or a loopback IP address (127.0.0.0/8, ::1), parsed, not prefix-matched.
pub fn check_loopback(url: &str) -> Result<(), ServeError> {
    let refuse = |why: &str| {
        ServeError::Load(format!(
            "`{url}`: {why}; load is only sent to loopback addresses (127.0.0.0/8, localhost, [::1])"
        ))
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| refuse(&format!("not a URL ({e})")))?;
    if parsed.scheme() != "http" {
        return Err(refuse("only http:// URLs"));
    }
    let host = parsed.host_str().unwrap_or("");
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>();
    if host == "localhost" || ip.is_ok_and(|ip| ip.is_loopback()) {
        Ok(())
    } else {
        Err(refuse(&format!("host `{host}` is not loopback")))
    }
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// An HTTP client for loopback load: enough idle connections for every client.
pub fn client(connections: usize) -> Result<reqwest::Client, ServeError> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections.max(1))
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .map_err(|e| ServeError::Load(format!("HTTP client: {e}")))
}

/// One request; the status (0: transport failure) and the answer when it was a 200.
async fn send(
    client: &reqwest::Client,
    url: &str,
    history: &[String],
    k: usize,
) -> (u16, Option<RecommendResponse>) {
    let body = json!({ "history": history, "k": k, "exclude_seen": true });
    match client.post(url).json(&body).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            if status == 200 {
                match resp.json::<RecommendResponse>().await {
                    Ok(r) => (200, Some(r)),
                    Err(_) => (0, None),
                }
            } else {
                let _ = resp.bytes().await;
                (status, None)
            }
        }
        Err(_) => (0, None),
    }
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    statuses: BTreeMap<String, usize>,
    /// When the last request finished (the end of the throughput window).
    last_finished: Option<Instant>,
}

impl Tally {
    fn add(&mut self, status: u16, latency_ms: f64) {
        *self.statuses.entry(status.to_string()).or_default() += 1;
        if status == 200 {
            self.latencies_ms.push(latency_ms);
        }
        self.last_finished = Some(Instant::now());
    }
}

fn report(mode: &str, arrivals: Arrivals, tally: Tally, start: Instant) -> LoadReport {
    let mut lat = tally.latencies_ms;
    lat.sort_by(f64::total_cmp);
    let requests: usize = tally.statuses.values().sum();
    let ok = tally.statuses.get("200").copied().unwrap_or(0);
    let server_errors = tally
        .statuses
        .iter()
        .filter(|(s, _)| s.starts_with('5'))
        .map(|(_, n)| n)
        .sum();
    let end = tally.last_finished.unwrap_or(start);
    let wall = end.duration_since(start).as_secs_f64().max(1e-9);
    let (concurrency, rate) = match arrivals {
        Arrivals::Closed { concurrency } => (Some(concurrency), None),
        Arrivals::Open { rate, .. } => (None, Some(rate)),
    };
    LoadReport {
        mode: mode.into(),
        concurrency,
        rate,
        requests,
        ok,
        errors: requests - ok,
        server_errors,
        statuses: tally.statuses,
        p50_ms: quantile(&lat, 0.50),
        p95_ms: quantile(&lat, 0.95),
        p99_ms: quantile(&lat, 0.99),
        mean_ms: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
        throughput_rps: ok as f64 / wall,
        wall_s: wall,
    }
}

/// Runs one load against `spec.url` (its `/v1/recommend`), histories drawn in a seeded
/// order from `histories`.
pub async fn run(
    client: &reqwest::Client,
    histories: Arc<Vec<Vec<String>>>,
    spec: &LoadSpec,
) -> Result<LoadReport, ServeError> {
    check_loopback(&spec.url)?;
    if histories.is_empty() {
        return Err(ServeError::Load("no histories to send".into()));
    }
    let url = format!("{}/v1/recommend", spec.url.trim_end_matches('/'));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let pick = {
        let n = histories.len();
        let seed = spec.seed as usize;
        move |i: usize| (i.wrapping_mul(7919).wrapping_add(seed)) % n
    };
    match spec.arrivals {
        Arrivals::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let (client, url, histories, tally, next) = (
                    client.clone(),
                    url.clone(),
                    histories.clone(),
                    tally.clone(),
                    next.clone(),
                );
                let (requests, k) = (spec.requests, spec.k);
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests || Instant::now() >= deadline {
                            break;
                        }
                        let t = Instant::now();
                        let (status, _) = send(&client, &url, &histories[pick(i)], k).await;
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        if let Ok(mut tally) = tally.lock() {
                            tally.add(status, ms);
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        Arrivals::Open { rate, max_inflight } => {
            let exp = Exp::new(rate.max(1e-9))
                .map_err(|e| ServeError::Load(format!("rate {rate}: {e}")))?;
            let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
            let inflight = Arc::new(AtomicUsize::new(0));
            let mut scheduled = start;
            let mut tasks = Vec::new();
            for i in 0..spec.requests {
                scheduled += Duration::from_secs_f64(exp.sample(&mut rng));
                if scheduled >= deadline {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                if inflight.load(Ordering::Relaxed) >= max_inflight {
                    if let Ok(mut tally) = tally.lock() {
                        tally.add(0, f64::NAN);
                    }
                    continue;
                }
                inflight.fetch_add(1, Ordering::Relaxed);
                let (client, url, histories, tally, inflight) = (
                    client.clone(),
                    url.clone(),
                    histories.clone(),
                    tally.clone(),
                    inflight.clone(),
                );
                let (k, at) = (spec.k, scheduled);
                tasks.push(tokio::spawn(async move {
                    let (status, _) = send(&client, &url, &histories[pick(i)], k).await;
                    let ms = at.elapsed().as_secs_f64() * 1e3;
                    if let Ok(mut tally) = tally.lock() {
                        tally.add(status, ms);
                    }
                    inflight.fetch_sub(1, Ordering::Relaxed);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    let tally = std::mem::take(
        &mut *tally
            .lock()
            .map_err(|_| ServeError::Load("poisoned".into()))?,
    );
    let mode = match spec.arrivals {
        Arrivals::Closed { .. } => "closed",
        Arrivals::Open { .. } => "open",
    };
    Ok(report(mode, spec.arrivals, tally, start))
}

/// One held-out case: the history the model reads (raw ids) and the item that came next.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalCase {
    pub history: Vec<String>,
    pub target: String,
}

/// The test split's cases in raw ids, in user order: each evaluated user's train and valid
/// items (what `meshrec eval` ranks from) and the test item.
pub fn test_cases(dataset: &Dataset) -> Vec<EvalCase> {
    let raw = |i: &u32| dataset.item_tokens[*i as usize].clone();
    dataset
        .users
        .iter()
        .filter_map(|u| {
            let (valid, test) = (u.valid?, u.test?);
            Some(EvalCase {
                history: u.train.iter().chain([&valid]).map(raw).collect(),
                target: raw(&test),
            })
        })
        .collect()
}

/// Ranking accuracy measured through the service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServedAccuracy {
    pub users: usize,
    pub errors: usize,
    #[serde(rename = "ndcg@10")]
    pub ndcg10: f64,
    #[serde(rename = "hr@10")]
    pub hr10: f64,
}

/// The target's rank from a top-k answer, ties counted against it (as offline evaluation
/// counts them): one plus the other listed items scoring at least the target's score.
pub fn rank_in_answer(answer: &RecommendResponse, target: &str) -> Option<usize> {
    let score = answer.items.iter().find(|i| i.item == target)?.score;
    Some(
        1 + answer
            .items
            .iter()
            .filter(|i| i.item != target && i.score >= score)
            .count(),
    )
}

/// NDCG@10 and HR@10 of the service's top-10 answers for `cases` (history items excluded,
/// as offline), `concurrency` requests at a time.
pub async fn evaluate(
    client: &reqwest::Client,
    url: &str,
    cases: Arc<Vec<EvalCase>>,
    concurrency: usize,
) -> Result<ServedAccuracy, ServeError> {
    check_loopback(url)?;
    let url = format!("{}/v1/recommend", url.trim_end_matches('/'));
    let next = Arc::new(AtomicUsize::new(0));
    let sums = Arc::new(Mutex::new((0usize, 0usize, 0.0f64, 0.0f64)));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, cases, next, sums) = (
            client.clone(),
            url.clone(),
            cases.clone(),
            next.clone(),
            sums.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let (status, answer) = send(&client, &url, &case.history, 10).await;
                let Ok(mut s) = sums.lock() else { break };
                s.0 += 1;
                match answer {
                    Some(answer) if status == 200 => {
                        if let Some(rank) = rank_in_answer(&answer, &case.target) {
                            if rank <= 10 {
                                s.2 += 1.0 / ((rank + 1) as f64).log2();
                                s.3 += 1.0;
                            }
                        }
                    }
                    _ => s.1 += 1,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let (users, errors, ndcg, hr) = *sums
        .lock()
        .map_err(|_| ServeError::Load("poisoned".into()))?;
    let n = users.max(1) as f64;
    Ok(ServedAccuracy {
        users,
        errors,
        ndcg10: ndcg / n,
        hr10: hr / n,
    })
}

/// One phase of a load step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub concurrency: usize,
    pub seconds: f64,
}

/// A sample of a load step's timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepSample {
    pub t_s: f64,
    pub concurrency: usize,
    pub active_workers: f64,
    pub queue_depth: f64,
    pub throughput_rps: f64,
    pub p95_ms: f64,
}

/// Closed-loop load whose concurrency follows `phases` (e.g. 1 -> 64 -> 1), sampling the
/// server's `/metrics` (active workers, queue depth) and the clients' throughput and p95
/// every `sample` — the autoscaler's figure.
pub async fn step(
    client: &reqwest::Client,
    url: &str,
    histories: Arc<Vec<Vec<String>>>,
    phases: &[Phase],
    sample: Duration,
) -> Result<Vec<StepSample>, ServeError> {
    check_loopback(url)?;
    if histories.is_empty() {
        return Err(ServeError::Load("no histories to send".into()));
    }
    let base = url.trim_end_matches('/').to_string();
    let rec_url = format!("{base}/v1/recommend");
    let max_c = phases.iter().map(|p| p.concurrency).max().unwrap_or(1);
    let target = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..max_c {
        let (client, url, histories, target, done, finished, counter) = (
            client.clone(),
            rec_url.clone(),
            histories.clone(),
            target.clone(),
            done.clone(),
            finished.clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if c >= target.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let (status, _) = send(&client, &url, &histories[i % histories.len()], 10).await;
                if status == 200 {
                    if let Ok(mut f) = finished.lock() {
                        f.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    let mut samples = Vec::new();
    for phase in phases {
        target.store(phase.concurrency, Ordering::Relaxed);
        let phase_end = Instant::now() + Duration::from_secs_f64(phase.seconds);
        while Instant::now() < phase_end {
            tokio::time::sleep(sample).await;
            let mut lat = std::mem::take(
                &mut *finished
                    .lock()
                    .map_err(|_| ServeError::Load("poisoned".into()))?,
            );
            lat.sort_by(f64::total_cmp);
            let metrics = match client.get(format!("{base}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            samples.push(StepSample {
                t_s: start.elapsed().as_secs_f64(),
                concurrency: phase.concurrency,
                active_workers: scrape_value(&metrics, "meshrec_active_workers")
                    .unwrap_or(f64::NAN),
                queue_depth: scrape_value(&metrics, "meshrec_queue_depth").unwrap_or(f64::NAN),
                throughput_rps: lat.len() as f64 / sample.as_secs_f64(),
                p95_ms: quantile(&lat, 0.95),
            });
        }
    }
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_loaded() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.3.2.1/",
            "http://localhost:9000/v1",
            "http://[::1]:8080",
        ] {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://127.0.0.1.example.com:8080",
            "http://10.0.0.1:8080",
            "https://127.0.0.1:8080",
            "http://[::2]:80",
            "127.0.0.1:8080",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nearest_rank_quantiles_and_ranks_with_ties_counted_against() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(quantile(&v, 0.5), 5.0);
        assert_eq!(quantile(&v, 0.95), 10.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
        let answer = RecommendResponse {
            items: [("a", 3.0), ("b", 2.0), ("c", 2.0), ("d", 1.0)]
                .iter()
                .map(|(i, s)| crate::http::Recommended {
                    item: i.to_string(),
                    score: *s,
                })
                .collect(),
            unknown: Vec::new(),
            model: String::new(),
        };
        assert_eq!(rank_in_answer(&answer, "a"), Some(1));
        // b and c tie: each ranks behind the other.
        assert_eq!(rank_in_answer(&answer, "c"), Some(3));
        assert_eq!(rank_in_answer(&answer, "b"), Some(3));
        assert_eq!(rank_in_answer(&answer, "d"), Some(4));
        assert_eq!(rank_in_answer(&answer, "z"), None);
    }
}
