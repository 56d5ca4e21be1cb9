//! The service's life: load a checkpoint (model, id maps, users) and start the pool, bind
//! the address, serve until told to stop, then drain — the listener closes, requests
//! already accepted are answered, the pool finishes its queue — and return.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use meshrec_model::checkpoint::{self, CheckpointMeta, UserHistories};
use meshrec_model::Recommender;

use crate::config::ServeConfig;
use crate::error::ServeError;
use crate::http::{router, AppState};
use crate::metrics::Metrics;
use crate::pool::Pool;

/// A loaded service, ready to bind.
pub struct Service {
    state: Arc<AppState>,
    max_body_bytes: usize,
}

impl Service {
    /// Loads `checkpoint` (the model rebuilt from its metadata; users from its sidecar) and
    /// starts the worker pool.
    pub fn from_checkpoint(
        checkpoint_path: &Path,
        config: &ServeConfig,
    ) -> Result<Self, ServeError> {
        config.validate()?;
        let first = &config.workers.devices[0];
        let device =
            meshrec_model::device::parse_device(first).map_err(|e| ServeError::Device {
                worker: 0,
                device: first.clone(),
                message: e.to_string(),
            })?;
        let (model, meta) = checkpoint::load(checkpoint_path, &device)?;
        let users = checkpoint::load_users(checkpoint_path, &meta)?;
        Self::new(&model, &meta, users, config)
    }

    /// A service for a model in memory.
    pub fn new(
        model: &Recommender,
        meta: &CheckpointMeta,
        users: Option<UserHistories>,
        config: &ServeConfig,
    ) -> Result<Self, ServeError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new(
            &config.workers.devices[..config.workers.max_workers],
        ));
        let pool = Pool::start(model, meta.config.max_len, config, metrics.clone())?;
        let item_ids = meta
            .item_tokens
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let has_users = users.is_some();
        let users: HashMap<String, Vec<u32>> = users
            .map(|u| u.tokens.into_iter().zip(u.items).collect())
            .unwrap_or_default();
        let state = AppState {
            pool,
            metrics,
            item_ids,
            item_tokens: meta.item_tokens.clone(),
            users,
            has_users,
            model_label: format!("{} ({})", meta.name, config.label()),
            max_len: meta.config.max_len,
            default_k: 10,
            max_history: config.limits.max_history,
            retry_after_s: config.limits.retry_after_s,
        };
        Ok(Self {
            state: Arc::new(state),
            max_body_bytes: config.limits.max_body_bytes,
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// Serves on `listener` until `stop` completes, then drains and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let app = router(self.state.clone(), self.max_body_bytes);
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| ServeError::Bind {
                addr,
                message: e.to_string(),
            })?;
        // Every connection is closed, so every accepted request has its answer and the
        // router's references to the state are gone. Dropping the state drops the pool,
        // which joins its threads: blocking work, so it runs off the async workers.
        let state = self.state;
        tokio::task::spawn_blocking(move || drop(state))
            .await
            .map_err(|e| ServeError::Stopped(format!("stopping the worker pool: {e}")))?;
        Ok(())
    }
}

/// Binds `addr` (e.g. `127.0.0.1:8080`; port 0 picks one).
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::Bind {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A service running on its own runtime thread (tests, benchmarks): its address, and a
/// handle that stops it as SIGTERM would.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
    pub metrics: Arc<Metrics>,
}

impl RunningServer {
    /// Starts `service` on `addr` in a thread with its own tokio runtime.
    pub fn start(service: Service, addr: &str) -> Result<Self, ServeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| ServeError::Stopped(format!("tokio runtime: {e}")))?;
        let listener = runtime.block_on(bind(addr))?;
        let local = listener.local_addr().map_err(|e| ServeError::Bind {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
        let metrics = service.metrics();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("meshrec-http".into())
            .spawn(move || {
                runtime.block_on(service.serve(listener, async move {
                    let _ = stop_rx.await;
                }))
            })
            .map_err(|e| ServeError::Stopped(format!("cannot start the server thread: {e}")))?;
        Ok(Self {
            addr: local,
            stop: Some(stop_tx),
            thread: Some(thread),
            metrics,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, answers what was accepted, and waits for the end.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| ServeError::Stopped("the server thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}
