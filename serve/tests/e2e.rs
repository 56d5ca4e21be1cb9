//! The service end to end over a real TCP socket with a real HTTP client (reqwest): the
//! ranking equals offline evaluation's, bad input gets its 4xx and the server stays up,
//! thousands of requests over 64 connections without a server error, shutdown under load
//! answers every accepted request, and the reduced models (int8, pruned) load and serve.
//! Tiny preset on synthetic data with a seeded, untrained model: fast and deterministic.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshrec_model::checkpoint::{self, CheckpointMeta, UserHistories};
use meshrec_model::data::{Dataset, EvalSet, EvalSplit, SyntheticConfig, TrainSet, WindowPolicy};
use meshrec_model::loss::{score_into, TableShard};
use meshrec_model::params::init_normal;
use meshrec_model::step::last_hidden;
use meshrec_model::{ModelConfig, Preset, Recommender, SideInputs};
use meshrec_serve::config::Kernels;
use meshrec_serve::engine::{Engine, EngineSettings};
use meshrec_serve::http::RecommendResponse;
use meshrec_serve::loadgen::{self, Arrivals, LoadSpec};
use meshrec_serve::topk::{order, Scored};
use meshrec_serve::{prune, RunningServer, ServeConfig, Service};
use serde_json::json;

struct Fixture {
    _dir: tempfile::TempDir,
    checkpoint: PathBuf,
    dataset: Dataset,
    config: ModelConfig,
    model: Recommender,
}

fn fixture() -> Fixture {
    fixture_with(Preset::Tiny)
}

fn fixture_with(preset: Preset) -> Fixture {
    let dataset = SyntheticConfig {
        users: 140,
        items: 80,
        zipf_exponent: 1.1,
        mean_length: 14.0,
        transition_prob: 0.6,
        seed: 7,
    }
    .dataset()
    .unwrap();
    let config = ModelConfig::preset(preset, dataset.num_items);
    let device = burn::tensor::Device::flex();
    let model = Recommender::new(&config, &SideInputs::default(), &device);
    let model = init_normal(model, 3, 0.3, config.n_layers, &device);
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("best.safetensors");
    let meta = CheckpointMeta::new("tiny", &config, &dataset);
    checkpoint::save(
        &model,
        &meta,
        Some(&UserHistories::from_dataset(&dataset)),
        &checkpoint,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        checkpoint,
        dataset,
        config,
        model,
    }
}

fn start(path: &Path, sets: &[&str]) -> RunningServer {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let config = ServeConfig::from_toml("", "test", &sets).unwrap();
    let service = Service::from_checkpoint(path, &config).unwrap();
    RunningServer::start(service, "127.0.0.1:0").unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Test-time histories (train + valid, raw ids), in user order.
fn test_histories(dataset: &Dataset) -> Vec<Vec<String>> {
    loadgen::test_cases(dataset)
        .into_iter()
        .map(|c| c.history)
        .collect()
}

/// The offline ranking's first ten for each test user: `last_hidden` on the evaluation
/// set's batches and `score_into` (what `meshrec eval` runs), history excluded, in full
/// sort order.
fn offline_top10(f: &Fixture) -> Vec<Vec<String>> {
    let device = burn::tensor::Device::flex();
    let set = EvalSet::new(&f.dataset, f.config.max_len, EvalSplit::Test);
    let table: Vec<f32> = f
        .model
        .item_table()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    let d = f.config.d_model;
    let v = f.config.vocab();
    let mut out = Vec::new();
    for batch in set.batches(64) {
        let h = last_hidden(&f.model, &batch, &device);
        let mut scores = vec![0f32; batch.len() * v];
        score_into(&mut scores, &h, TableShard::new(&table, d, 0));
        for (i, history) in batch.histories.iter().enumerate() {
            let mut all: Vec<Scored> = (1..v)
                .filter(|j| !history.contains(&(*j as u32)))
                .map(|j| Scored {
                    item: j as u32,
                    score: scores[i * v + j],
                })
                .collect();
            all.sort_by(order);
            out.push(
                all.iter()
                    .take(10)
                    .map(|s| f.dataset.item_tokens[s.item as usize].clone())
                    .collect(),
            );
        }
    }
    out
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = client
        .post(format!("{url}/v1/recommend"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[test]
fn fp32_top10_equals_the_offline_ranking_with_and_without_batching() {
    let f = fixture();
    let expected = offline_top10(&f);
    let histories = test_histories(&f.dataset);
    assert!(histories.len() >= 100, "{} test users", histories.len());
    let rt = runtime();
    for sets in [
        &[][..],
        &["batching.max_batch=8", "batching.max_delay_us=3000"][..],
    ] {
        let server = start(&f.checkpoint, sets);
        let url = server.url();
        let client = loadgen::client(16).unwrap();
        let answers: Vec<RecommendResponse> = rt.block_on(async {
            let mut tasks = Vec::new();
            for h in histories.iter().take(100) {
                let (client, url) = (client.clone(), url.clone());
                let request = json!({"history": h, "k": 10});
                tasks.push(tokio::spawn(async move {
                    let (status, body) = post(&client, &url, request).await;
                    assert_eq!(status, 200, "{body}");
                    serde_json::from_value::<RecommendResponse>(body).unwrap()
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        for (i, answer) in answers.iter().enumerate() {
            let items: Vec<String> = answer.items.iter().map(|s| s.item.clone()).collect();
            assert_eq!(items, expected[i], "user {i} with {sets:?}");
            assert!(answer.unknown.is_empty());
        }
        if !sets.is_empty() {
            let metrics = server.metrics.render();
            assert!(
                !metrics.contains("meshrec_batch_size_bucket{le=\"1\"} 100"),
                "batching never formed a batch"
            );
        }
        server.shutdown().unwrap();
    }
}

#[test]
fn every_bad_input_gets_its_status_and_the_next_good_request_succeeds() {
    let f = fixture();
    let server = start(&f.checkpoint, &["limits.max_body_bytes=2048"]);
    let url = server.url();
    let good_history: Vec<String> = f.dataset.item_tokens[1..4].to_vec();
    let user = f.dataset.user_tokens[0].clone();
    let rt = runtime();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let raw = |body: &'static str| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let resp = client
                    .post(format!("{url}/v1/recommend"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                (status, resp.text().await.unwrap())
            }
        };
        let cases: Vec<(u16, serde_json::Value, &str)> = vec![
            (422, json!({"history": 5}), "invalid request"),
            (422, json!({"history": [1, 2]}), "invalid request"),
            (
                422,
                json!({"history": ["1"], "k": "ten"}),
                "invalid request",
            ),
            (422, json!({"historyy": ["1"]}), "unknown field"),
            (404, json!({"user": "no-such-user"}), "unknown user"),
            (422, json!({"history": ["nope", "never"]}), "no known item"),
            (422, json!({"history": good_history, "k": 0}), "`k` is 0"),
            (
                422,
                json!({"history": good_history, "k": 100000}),
                "`k` is 100000",
            ),
            (422, json!({}), "give `history`"),
            (
                422,
                json!({"history": good_history, "user": user}),
                "not both",
            ),
        ];
        for (status, body, says) in cases {
            let (got, answer) = post(&client, &url, body.clone()).await;
            assert_eq!(got, status, "{body} -> {answer}");
            assert!(
                answer["error"].as_str().unwrap_or("").contains(says),
                "{body} -> {answer}"
            );
            let (ok, _) = post(&client, &url, json!({"history": good_history})).await;
            assert_eq!(ok, 200, "after {body}");
        }
        let (status, text) = raw("{\"history\": [").await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("invalid JSON"), "{text}");
        let big = format!("{{\"history\": [{}]}}", vec!["\"1\""; 2000].join(","));
        let resp = client
            .post(format!("{url}/v1/recommend"))
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 413);
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("\"error\"") && text.contains("limit"),
            "{text}"
        );
        // Unknown items are listed, not fatal; a user's history is served.
        let mixed = json!({"history": [good_history[0].clone(), "x-unknown"], "k": 5});
        let (status, answer) = post(&client, &url, mixed).await;
        assert_eq!(status, 200);
        assert_eq!(answer["unknown"], json!(["x-unknown"]));
        assert_eq!(answer["items"].as_array().unwrap().len(), 5);
        let (status, answer) = post(&client, &url, json!({"user": user, "k": 3})).await;
        assert_eq!(status, 200, "{answer}");
        let health = client.get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 200);
        let metrics = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for name in [
            "meshrec_requests_total{status=\"422\"}",
            "meshrec_requests_total{status=\"413\"}",
            "meshrec_request_duration_seconds_bucket",
            "meshrec_batch_size_bucket",
            "meshrec_queue_depth",
            "meshrec_active_workers 1",
        ] {
            assert!(metrics.contains(name), "{name} missing from\n{metrics}");
        }
    });
    server.shutdown().unwrap();
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_recovers() {
    // A model slow enough (the `base` preset, 200 positions) that a burst of requests finds
    // the one-slot queue full while the single worker runs.
    let f = fixture_with(Preset::Base);
    let server = start(
        &f.checkpoint,
        &["limits.max_queue=1", "workers.max_inflight=1"],
    );
    let url = server.url();
    let history: Vec<String> = f.dataset.item_tokens[1..4].to_vec();
    let rt = runtime();
    rt.block_on(async {
        let client = loadgen::client(32).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..24 {
            let (client, url, history) = (client.clone(), url.clone(), history.clone());
            tasks.push(tokio::spawn(async move {
                let resp = client
                    .post(format!("{url}/v1/recommend"))
                    .json(&json!({"history": history}))
                    .send()
                    .await
                    .unwrap();
                (
                    resp.status().as_u16(),
                    resp.headers().get("retry-after").is_some(),
                )
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        let rejected = statuses.iter().filter(|s| s.0 == 503).count();
        assert!(rejected > 0, "{statuses:?}");
        assert!(
            statuses.iter().all(|s| s.0 == 200 || (s.0 == 503 && s.1)),
            "{statuses:?}"
        );
        let (status, _) = post(&client, &url, json!({"history": history})).await;
        assert_eq!(status, 200);
    });
    server.shutdown().unwrap();
}

#[test]
fn five_thousand_requests_over_64_connections_without_a_server_error() {
    let f = fixture();
    let server = start(
        &f.checkpoint,
        &[
            "batching.max_batch=32",
            "batching.max_delay_us=1000",
            "workers.devices=[\"cpu\", \"cpu\"]",
            "workers.max_workers=2",
            "limits.max_queue=4096",
        ],
    );
    let histories = Arc::new(test_histories(&f.dataset));
    let rt = runtime();
    let report = rt
        .block_on(loadgen::run(
            &loadgen::client(64).unwrap(),
            histories,
            &LoadSpec {
                url: server.url(),
                arrivals: Arrivals::Closed { concurrency: 64 },
                requests: 5000,
                duration: Duration::from_secs(120),
                k: 10,
                seed: 1,
            },
        ))
        .unwrap();
    assert_eq!(report.requests, 5000, "{report:?}");
    assert_eq!(report.server_errors, 0, "{report:?}");
    assert_eq!(report.ok, 5000, "{report:?}");
    server.shutdown().unwrap();
}

#[test]
fn shutdown_under_load_answers_every_accepted_request() {
    let f = fixture();
    let server = start(
        &f.checkpoint,
        &["batching.max_batch=16", "batching.max_delay_us=2000"],
    );
    let url = server.url();
    let metrics = server.metrics.clone();
    let histories = Arc::new(test_histories(&f.dataset));
    let rt = runtime();
    let load = {
        let url = url.clone();
        std::thread::spawn(move || {
            rt.block_on(async move {
                let client = loadgen::client(32).unwrap();
                let mut tasks = Vec::new();
                for c in 0..32usize {
                    let (client, url, histories) = (client.clone(), url.clone(), histories.clone());
                    tasks.push(tokio::spawn(async move {
                        let (mut ok, mut other) = (0usize, Vec::new());
                        for i in 0..400usize {
                            let body =
                                json!({"history": histories[(c * 31 + i) % histories.len()]});
                            match client
                                .post(format!("{url}/v1/recommend"))
                                .json(&body)
                                .send()
                                .await
                            {
                                Ok(resp) => {
                                    let status = resp.status().as_u16();
                                    if status == 200
                                        && resp.json::<RecommendResponse>().await.is_ok()
                                    {
                                        ok += 1;
                                    } else {
                                        other.push(status);
                                    }
                                }
                                // Refused or closed before the server read it: not accepted.
                                Err(_) => break,
                            }
                        }
                        (ok, other)
                    }));
                }
                let mut ok = 0;
                let mut other = Vec::new();
                for t in tasks {
                    let (o, s) = t.await.unwrap();
                    ok += o;
                    other.extend(s);
                }
                (ok, other)
            })
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let accepted_before = metrics.accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(accepted_before > 0, "the load never reached the server");
    server.shutdown().unwrap();
    let (client_ok, other) = load.join().unwrap();
    let accepted = metrics.accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(other.is_empty(), "non-200 answers: {other:?}");
    assert_eq!(
        metrics.answered(),
        accepted,
        "accepted requests without an answer"
    );
    assert_eq!(
        metrics.status_count(200) as usize,
        client_ok,
        "answers that never reached the client"
    );
}

#[test]
fn host_kernels_match_burn_and_int8_stays_close() {
    let f = fixture();
    let device = burn::tensor::Device::flex();
    let contexts: Vec<Vec<u32>> = f
        .dataset
        .users
        .iter()
        .take(20)
        .map(|u| {
            let h: Vec<u32> = u.history().collect();
            h[h.len().saturating_sub(f.config.max_len)..].to_vec()
        })
        .collect();
    let refs: Vec<&[u32]> = contexts.iter().map(|c| c.as_slice()).collect();
    let engine = |kernels, int8| {
        Engine::new(
            &f.model,
            f.config.max_len,
            EngineSettings { kernels, int8 },
            &device,
        )
    };
    let burn_scores = engine(Kernels::Burn, false).score_contexts(&refs);
    let host_scores = engine(Kernels::Host, false).score_contexts(&refs);
    let int8_scores = engine(Kernels::Host, true).score_contexts(&refs);
    let scale = burn_scores.iter().fold(0.0f32, |m, s| m.max(s.abs()));
    for (a, b) in burn_scores.iter().zip(&host_scores) {
        assert!(
            (a - b).abs() <= 1e-4 * scale.max(1.0),
            "host {b} vs burn {a}"
        );
    }
    let worst = burn_scores
        .iter()
        .zip(&int8_scores)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 0.05 * scale,
        "int8 error {worst} against a score scale {scale}"
    );
    // The int8 table is a byte per weight (rows padded to panels of 16, columns to groups
    // of 4) plus a scale and a row sum per row, where f32 takes four.
    let t8 = engine(Kernels::Host, true).table_bytes();
    let t32 = engine(Kernels::Burn, false).table_bytes();
    let d = f.config.d_model;
    let rows = t32 / (4 * d);
    assert_eq!(
        t8,
        rows.next_multiple_of(16) * d.next_multiple_of(4) + 8 * rows,
        "{t8} vs {t32}"
    );
}

#[test]
fn pruned_and_int8_checkpoints_load_and_serve() {
    let f = fixture();
    let device = burn::tensor::Device::flex().autodiff();
    let train = TrainSet::new(&f.dataset, f.config.max_len, WindowPolicy::All).unwrap();
    let batches: Vec<_> = train.epoch(0, 0, 32).take(3).collect();
    // On the autodiff device with tracked parameters, as a trained model is.
    let values = meshrec_model::params::read_values(&f.model);
    let model =
        meshrec_model::params::write_values(f.model.clone().fork(&device), &values, &device);
    let importance = prune::importance(&model, batches, &device).unwrap();
    assert_eq!(importance.heads.len(), f.config.n_layers);
    assert!(importance.heads.iter().flatten().any(|&s| s > 0.0));
    // Keeping everything reproduces the model exactly; pruning shrinks it.
    let keep_all = prune::plan(&importance, 0.0, 0.0);
    let same = prune::apply(
        &model,
        &f.config,
        &SideInputs::default(),
        &keep_all,
        &device,
    )
    .unwrap();
    let flex = burn::tensor::Device::flex();
    let ctx: Vec<u32> = (1..=6).collect();
    let settings = EngineSettings {
        kernels: Kernels::Burn,
        int8: false,
    };
    let a = Engine::new(&f.model, f.config.max_len, settings, &flex).score_contexts(&[&ctx]);
    let b = Engine::new(&same, f.config.max_len, settings, &flex).score_contexts(&[&ctx]);
    assert_eq!(a, b);
    let plan = prune::plan(&importance, 0.5, 0.5);
    assert_eq!(plan.heads_removed(&importance), 8);
    let pruned = prune::apply(&model, &f.config, &SideInputs::default(), &plan, &device).unwrap();
    use burn::module::Module;
    assert!(pruned.num_params() < model.num_params());
    let path = f.checkpoint.with_file_name("pruned.safetensors");
    let meta = CheckpointMeta::new("tiny-pruned", &f.config, &f.dataset);
    checkpoint::save(
        &pruned,
        &meta,
        Some(&UserHistories::from_dataset(&f.dataset)),
        &path,
    )
    .unwrap();
    let read = checkpoint::read_meta(&path).unwrap();
    assert_eq!(read.blocks.iter().map(|b| b.heads).sum::<usize>(), 8);
    let history: Vec<String> = f.dataset.item_tokens[1..6].to_vec();
    let rt = runtime();
    for (checkpoint, sets) in [(&path, &[][..]), (&f.checkpoint, &["model.int8=true"][..])] {
        let server = start(checkpoint, sets);
        let url = server.url();
        let (status, answer) = rt.block_on(async {
            post(
                &reqwest::Client::new(),
                &url,
                json!({"history": history, "k": 7}),
            )
            .await
        });
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["items"].as_array().unwrap().len(), 7);
        server.shutdown().unwrap();
    }
}
