//! The worker pool: a bounded queue of accepted requests, a batching thread that closes
//! batches by [`BatchPolicy`] and hands each to a worker chosen by [`dispatch::pick`], the
//! worker threads (each with its own engine on its own device) and the autoscaler thread
//! that sets how many workers take batches. Shutting down drains: every accepted request is
//! answered before the threads end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use meshrec_model::Recommender;

use crate::autoscale::{Autoscaler, Signals};
use crate::batcher::{BatchPolicy, Decision};
use crate::config::ServeConfig;
use crate::dispatch::{pick, update_speed, WorkerLoad};
use crate::engine::{Engine, EngineSettings, Query};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::topk::Scored;

/// One accepted request on its way to a worker.
pub struct Job {
    pub query: Query,
    pub reply: tokio::sync::oneshot::Sender<Vec<Scored>>,
}

/// What the dispatcher and the workers share.
struct Shared {
    loads: Mutex<Vec<WorkerLoad>>,
    changed: Condvar,
    /// Accepted requests not yet in a running batch.
    waiting: AtomicUsize,
    /// Workers ordered fastest first: the autoscaler activates a prefix of this order.
    order: Mutex<Vec<usize>>,
}

impl Shared {
    fn set_active(&self, n: usize) {
        let order = self.order.lock().map(|o| o.clone()).unwrap_or_default();
        if let Ok(mut loads) = self.loads.lock() {
            for (rank, &w) in order.iter().enumerate() {
                loads[w].active = rank < n;
            }
        }
        self.changed.notify_all();
    }
}

/// The running pool.
pub struct Pool {
    queue: Option<Sender<Job>>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    batcher: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    autoscaler: Option<JoinHandle<()>>,
}

/// A worker's first report: ready with this measured speed, or failed.
type Ready = Result<f64, ServeError>;

impl Pool {
    /// Starts `config.workers.max_workers` workers on the first devices of
    /// `config.workers.devices`, each building its engine from `model` on its device and
    /// timing a warm-up batch (its initial speed), then the batcher and, when enabled, the
    /// autoscaler.
    pub fn start(
        model: &Recommender,
        max_len: usize,
        config: &ServeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServeError> {
        let n = config.workers.max_workers;
        let settings = EngineSettings {
            kernels: config.model.kernels,
            int8: config.model.int8,
        };
        let shared = Arc::new(Shared {
            loads: Mutex::new(vec![
                WorkerLoad {
                    active: false,
                    inflight_batches: 0,
                    inflight_rows: 0,
                    rows_per_s: 1.0,
                };
                n
            ]),
            changed: Condvar::new(),
            waiting: AtomicUsize::new(0),
            order: Mutex::new((0..n).collect()),
        });
        let (ready_tx, ready_rx) = bounded::<(usize, Ready)>(n);
        let mut worker_txs = Vec::new();
        let mut workers = Vec::new();
        for w in 0..n {
            // Bounded like everything else: the dispatcher never gives a worker more than
            // `max_inflight` batches, so a send never waits.
            let (tx, rx) = bounded::<Vec<Job>>(config.workers.max_inflight);
            worker_txs.push(tx);
            let device_name = config.workers.devices[w].clone();
            let model = model.clone();
            let shared = shared.clone();
            let metrics = metrics.clone();
            let ready = ready_tx.clone();
            // The warm-up batch only ranks the workers (real batches refine the speed), so
            // a huge max_batch does not make it allocate without bound.
            let warm_rows = config.batching.max_batch.min(256);
            let handle = std::thread::Builder::new()
                .name(format!("meshrec-worker-{w}"))
                .spawn(move || {
                    let device = match meshrec_model::device::parse_device(&device_name) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = ready.send((
                                w,
                                Err(ServeError::Device {
                                    worker: w,
                                    device: device_name,
                                    message: e.to_string(),
                                }),
                            ));
                            return;
                        }
                    };
                    let engine = Engine::new(&model, max_len, settings, &device);
                    drop(model);
                    let speed = warm_up(&engine, warm_rows);
                    let _ = ready.send((w, Ok(speed)));
                    drop(ready);
                    worker_loop(w, &engine, &rx, &shared, &metrics);
                })
                .map_err(|e| ServeError::Stopped(format!("cannot start worker {w}: {e}")))?;
            workers.push(handle);
        }
        drop(ready_tx);
        let mut speeds = vec![0.0; n];
        for _ in 0..n {
            let (w, result) = ready_rx
                .recv()
                .map_err(|_| ServeError::Stopped("a worker died while starting".into()))?;
            speeds[w] = result?;
        }
        {
            let mut loads = shared
                .loads
                .lock()
                .map_err(|_| ServeError::Stopped("poisoned".into()))?;
            for (l, s) in loads.iter_mut().zip(&speeds) {
                l.rows_per_s = *s;
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| speeds[b].total_cmp(&speeds[a]));
        if let Ok(mut o) = shared.order.lock() {
            *o = order;
        }
        for (w, s) in speeds.iter().enumerate() {
            metrics.workers[w]
                .speed_bits
                .store(s.to_bits(), Ordering::Relaxed);
        }
        let initial = if config.autoscale.enabled {
            config.workers.min_workers
        } else {
            n
        };
        shared.set_active(initial);
        metrics.active_workers.store(initial, Ordering::Relaxed);

        let (queue_tx, queue_rx) = bounded::<Job>(config.limits.max_queue);
        let policy = BatchPolicy {
            max_batch: config.batching.max_batch,
            max_delay_us: config.batching.max_delay_us,
        };
        let max_inflight = config.workers.max_inflight;
        let batcher = {
            let shared = shared.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("meshrec-batcher".into())
                .spawn(move || {
                    batch_loop(
                        &queue_rx,
                        policy,
                        worker_txs,
                        max_inflight,
                        &shared,
                        &metrics,
                    )
                })
                .map_err(|e| ServeError::Stopped(format!("cannot start the batcher: {e}")))?
        };
        let stop = Arc::new(AtomicBool::new(false));
        let autoscaler = if config.autoscale.enabled {
            let shared = shared.clone();
            let metrics = metrics.clone();
            let stop = stop.clone();
            let mut scaler = Autoscaler::new(&config.autoscale, config.workers.min_workers, n);
            let tick = Duration::from_millis(config.autoscale.tick_ms);
            Some(
                std::thread::Builder::new()
                    .name("meshrec-autoscaler".into())
                    .spawn(move || {
                        let start = Instant::now();
                        while !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(tick);
                            let signals = Signals {
                                queue_depth: shared.waiting.load(Ordering::Relaxed) as f64,
                                p95_ms: metrics.drain_recent_p95_ms(),
                            };
                            let before = scaler.active();
                            let active =
                                scaler.observe(start.elapsed().as_millis() as u64, signals);
                            if active != before {
                                tracing::info!(active, ?signals, "autoscaler: active workers");
                                shared.set_active(active);
                                metrics.active_workers.store(active, Ordering::Relaxed);
                            }
                        }
                    })
                    .map_err(|e| {
                        ServeError::Stopped(format!("cannot start the autoscaler: {e}"))
                    })?,
            )
        } else {
            None
        };
        Ok(Self {
            queue: Some(queue_tx),
            shared,
            metrics,
            stop,
            batcher: Some(batcher),
            workers,
            autoscaler,
        })
    }

    /// Queues a request; gives it back when the queue is full (or the pool is stopping).
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let Some(queue) = &self.queue else {
            return Err(job);
        };
        // Counted before it is visible to the batcher, so the count never goes below zero.
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        match queue.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.store(
                    self.shared.waiting.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                Ok(())
            }
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(job)
            }
        }
    }

    /// Stops taking requests, answers every queued one, and ends the threads.
    pub fn shutdown(mut self) {
        self.close();
    }

    fn close(&mut self) {
        self.queue = None;
        if let Some(b) = self.batcher.take() {
            let _ = b.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.autoscaler.take() {
            let _ = a.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}

/// Times a batch of `rows` full-length queries (after one untimed): the worker's first
/// measured speed, rows per second.
fn warm_up(engine: &Engine, rows: usize) -> f64 {
    let context: Vec<u32> = (0..engine.max_len)
        .map(|i| 1 + (i % engine.num_items().max(1)) as u32)
        .collect();
    let queries: Vec<Query> = (0..rows.max(1))
        .map(|_| Query {
            context: context.clone(),
            exclude: Vec::new(),
            k: 10,
        })
        .collect();
    engine.recommend(&queries);
    let start = Instant::now();
    engine.recommend(&queries);
    queries.len() as f64 / start.elapsed().as_secs_f64().max(1e-6)
}

fn batch_loop(
    queue: &Receiver<Job>,
    policy: BatchPolicy,
    workers: Vec<Sender<Vec<Job>>>,
    max_inflight: usize,
    shared: &Shared,
    metrics: &Metrics,
) {
    let clock = Instant::now();
    let micros = |t: Instant| t.duration_since(clock).as_micros() as u64;
    // `recv` keeps returning queued jobs after the senders are gone: shutdown drains.
    while let Ok(first) = queue.recv() {
        let first_us = micros(Instant::now());
        let mut batch = vec![first];
        loop {
            // What has queued meanwhile joins without waiting.
            while batch.len() < policy.max_batch {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let worker_idle = shared
                .loads
                .lock()
                .map(|loads| loads.iter().any(|l| l.active && l.inflight_batches == 0))
                .unwrap_or(false);
            match policy.decide(batch.len(), first_us, micros(Instant::now()), worker_idle) {
                Decision::Close => break,
                Decision::WaitUntil(t) => {
                    let wait = Duration::from_micros(t.saturating_sub(micros(Instant::now())));
                    match queue.recv_timeout(wait) {
                        Ok(job) => batch.push(job),
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        let rows = batch.len();
        let Ok(mut loads) = shared.loads.lock() else {
            return;
        };
        let w = loop {
            match pick(&loads, rows, max_inflight) {
                Some(w) => break w,
                None => match shared.changed.wait(loads) {
                    Ok(l) => loads = l,
                    Err(_) => return,
                },
            }
        };
        loads[w].inflight_batches += 1;
        loads[w].inflight_rows += rows;
        drop(loads);
        metrics.batch_size.observe(rows as f64);
        // The channel holds at most `max_inflight` batches and the dispatcher never gives a
        // worker more, so this does not wait; it fails only if the worker thread is gone,
        // and then the batch's replies drop (500s).
        let _ = workers[w].send(batch);
    }
}

fn worker_loop(
    w: usize,
    engine: &Engine,
    batches: &Receiver<Vec<Job>>,
    shared: &Shared,
    metrics: &Metrics,
) {
    while let Ok(batch) = batches.recv() {
        let rows = batch.len();
        let left = shared.waiting.fetch_sub(rows, Ordering::Relaxed) - rows;
        metrics.queue_depth.store(left, Ordering::Relaxed);
        let start = Instant::now();
        let (queries, replies): (Vec<Query>, Vec<_>) =
            batch.into_iter().map(|j| (j.query, j.reply)).unzip();
        // A panic inside the engine fails this batch alone: its replies drop (their
        // requests get 500s), the worker stays in the pool and its counts stay right.
        let results =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.recommend(&queries)));
        let seconds = start.elapsed().as_secs_f64();
        match results {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    // A client that went away drops its receiver; nothing to do.
                    let _ = reply.send(result);
                }
            }
            Err(_) => tracing::error!(worker = w, rows, "the engine panicked on a batch"),
        }
        let wm = &metrics.workers[w];
        wm.batches.fetch_add(1, Ordering::Relaxed);
        wm.rows.fetch_add(rows as u64, Ordering::Relaxed);
        if let Ok(mut loads) = shared.loads.lock() {
            let l = &mut loads[w];
            l.inflight_batches -= 1;
            l.inflight_rows -= rows;
            l.rows_per_s = update_speed(l.rows_per_s, rows, seconds);
            wm.speed_bits
                .store(l.rows_per_s.to_bits(), Ordering::Relaxed);
        }
        shared.changed.notify_all();
    }
}
