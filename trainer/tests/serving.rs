//! Serving from what the trainer writes: a trained run's best model is a serving
//! checkpoint (metadata and users sidecar), a distilled student and a pruned model load and
//! serve, and the real `meshrec serve` process drains under load on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meshrec_model::checkpoint;
use meshrec_model::device::test_device;
use meshrec_serve::{RunningServer, ServeConfig, Service};
use meshrec_trainer::serving::{distill, prune_checkpoint, DistillOptions, PruneOptions};
use meshrec_trainer::train;
use serde_json::json;

mod common;

fn recommend_ok(url: &str, history: &[String]) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/recommend"))
            .json(&json!({"history": history, "k": 5}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.json().await.unwrap()
    })
}

#[test]
fn trained_pruned_and_distilled_checkpoints_serve_and_sigterm_drains() {
    let dir = tempfile::tempdir().unwrap();
    let device = test_device().autodiff();
    let config = common::synthetic_config(dir.path(), "teacher", &["train.epochs=2"]);
    let summary = train::train(&config, &device, "cpu", None).unwrap();
    let meta = checkpoint::read_meta(&summary.checkpoint).unwrap();
    assert_eq!(meta.name, "tiny");
    assert_eq!(meta.item_tokens.len(), meta.config.num_items + 1);
    let users = checkpoint::load_users(&summary.checkpoint, &meta)
        .unwrap()
        .unwrap();
    assert_eq!(users.tokens.len(), 60);
    let history: Vec<String> = meta.item_tokens[1..5].to_vec();

    let student_config = common::synthetic_config(
        dir.path(),
        "student",
        &["model.d_model=8", "model.n_heads=2", "model.d_ff=16"],
    );
    let student_path = dir.path().join("student.safetensors");
    let student = distill(
        &student_config,
        &summary.checkpoint,
        &DistillOptions {
            temperature: 2.0,
            hard: 0.5,
            epochs: 1,
            lr: 1e-3,
            patience: 0,
        },
        &student_path,
        &device,
    )
    .unwrap();
    assert!(student.params_after < student.params_before, "{student:?}");
    let pruned_path = dir.path().join("pruned.safetensors");
    let pruned = prune_checkpoint(
        &config,
        &summary.checkpoint,
        &PruneOptions {
            heads: 0.25,
            channels: 0.5,
            importance_batches: 2,
            finetune_epochs: 1,
            lr: 5e-4,
        },
        &pruned_path,
        &device,
    )
    .unwrap();
    assert_eq!(pruned.heads.iter().sum::<usize>(), 12, "{pruned:?}");
    for path in [&student_path, &pruned_path] {
        let server = RunningServer::start(
            Service::from_checkpoint(path, &ServeConfig::default()).unwrap(),
            "127.0.0.1:0",
        )
        .unwrap();
        let answer = recommend_ok(&server.url(), &history);
        assert_eq!(answer["items"].as_array().unwrap().len(), 5);
        server.shutdown().unwrap();
    }

    // The real binary: SIGTERM under load answers every accepted request, then exits 0.
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshrec"))
        .args([
            "serve",
            "--set",
            "batching.max_batch=8",
            "--set",
            "batching.max_delay_us=1000",
        ])
        .arg("--checkpoint")
        .arg(&summary.checkpoint)
        .args(["--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    // Kept open until the child exits: it prints again when it has drained.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in `{line}`"))
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let history = Arc::new(history);
    let load = {
        let url = url.clone();
        std::thread::spawn(move || {
            rt.block_on(async move {
                let client = reqwest::Client::new();
                let mut tasks = Vec::new();
                for _ in 0..16 {
                    let (client, url, history) = (client.clone(), url.clone(), history.clone());
                    tasks.push(tokio::spawn(async move {
                        let (mut ok, mut bad) = (0, 0);
                        for _ in 0..2000 {
                            match client
                                .post(format!("{url}/v1/recommend"))
                                .json(&json!({"history": *history}))
                                .send()
                                .await
                            {
                                Ok(r) if r.status().as_u16() == 200 => ok += 1,
                                Ok(_) => bad += 1,
                                Err(_) => break,
                            }
                        }
                        (ok, bad)
                    }));
                }
                let mut total = (0, 0);
                for t in tasks {
                    let (o, b) = t.await.unwrap();
                    total.0 += o;
                    total.1 += b;
                }
                total
            })
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "meshrec serve exited with {exit}");
    drop(stdout);
    let (ok, bad) = load.join().unwrap();
    assert!(ok > 0, "no request was answered before SIGTERM");
    assert_eq!(bad, 0, "answers other than 200 during the drain");
}
