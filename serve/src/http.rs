//! The HTTP/1.1 + JSON front on axum: `POST /v1/recommend`, `GET /healthz`, `GET /metrics`.
//! Every bad input gets a 4xx whose JSON body names the problem; a full queue gets 503 with
//! `Retry-After`; a body over the limit gets 413 before it is read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::Query;
use crate::metrics::Metrics;
use crate::pool::{Job, Pool};

/// A recommendation request: a history of raw item ids, or a raw user id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    pub history: Option<Vec<String>>,
    pub user: Option<String>,
    pub k: Option<usize>,
    pub exclude_seen: Option<bool>,
}

/// One recommended item.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct Recommended {
    pub item: String,
    pub score: f32,
}

/// The answer.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct RecommendResponse {
    pub items: Vec<Recommended>,
    pub unknown: Vec<String>,
    pub model: String,
}

/// What the handlers read.
pub struct AppState {
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub item_ids: HashMap<String, u32>,
    pub item_tokens: Vec<String>,
    pub users: HashMap<String, Vec<u32>>,
    pub has_users: bool,
    pub model_label: String,
    pub max_len: usize,
    pub default_k: usize,
    pub max_history: usize,
    pub retry_after_s: u64,
}

impl AppState {
    fn num_items(&self) -> usize {
        self.item_tokens.len() - 1
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Counts and times every response of the API routes (413s from the body limit included).
async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let counted = request.uri().path().starts_with("/v1/");
    let response = next.run(request).await;
    if counted {
        state
            .metrics
            .request(response.status().as_u16(), start.elapsed().as_secs_f64());
    }
    response
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/recommend", post(recommend))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({
        "status": "ok",
        "model": state.model_label,
        "items": state.num_items(),
        "active_workers": state.metrics.active_workers.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Validates a request into a query (or the 4xx that refuses it) and the unknown ids.
// The error is axum's own response, returned as is by the handler: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn to_query(state: &AppState, body: &[u8]) -> Result<(Query, Vec<String>), Response> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    let req: RecommendRequest = serde_json::from_value(value).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "invalid request: {e} (expected {{\"history\": [\"<raw item id>\", ...]}} or \
                 {{\"user\": \"<raw user id>\"}}, optional \"k\": integer, \"exclude_seen\": bool)"
            ),
        )
    })?;
    let k = req.k.unwrap_or(state.default_k);
    if k == 0 || k > state.num_items() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`k` is {k}; it must be in 1..={}", state.num_items()),
        ));
    }
    let exclude_seen = req.exclude_seen.unwrap_or(true);
    let (known, unknown) = match (req.history, req.user) {
        (Some(_), Some(_)) => {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "give `history` or `user`, not both",
            ))
        }
        (None, None) => {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "give `history` (raw item ids) or `user` (a raw user id)",
            ))
        }
        (None, Some(user)) => {
            if !state.has_users {
                return Err(error(
                    StatusCode::NOT_FOUND,
                    "this checkpoint has no users file: send a `history`",
                ));
            }
            match state.users.get(&user) {
                Some(items) => (items.clone(), Vec::new()),
                None => {
                    return Err(error(
                        StatusCode::NOT_FOUND,
                        format!("unknown user `{user}`"),
                    ))
                }
            }
        }
        (Some(history), None) => {
            if history.len() > state.max_history {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "`history` has {} items; at most {} are accepted",
                        history.len(),
                        state.max_history
                    ),
                ));
            }
            let mut known = Vec::with_capacity(history.len());
            let mut unknown = Vec::new();
            for raw in history {
                match state.item_ids.get(&raw) {
                    Some(&id) => known.push(id),
                    None => unknown.push(raw),
                }
            }
            (known, unknown)
        }
    };
    if known.is_empty() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "no known item in the history (unknown: {})",
                serde_json::to_string(&unknown).unwrap_or_default()
            ),
        ));
    }
    Ok((
        Query::from_history(&known, state.max_len, k, exclude_seen),
        unknown,
    ))
}

async fn recommend(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state
        .metrics
        .accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A body over the limit (413) or one that cannot be read gets a JSON error like every
    // other refusal.
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return error(
                rejection.status(),
                format!("request body: {}", rejection.body_text()),
            )
        }
    };
    let (query, unknown) = match to_query(&state, &body) {
        Ok(q) => q,
        Err(response) => return response,
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state.pool.submit(Job { query, reply }).is_err() {
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests queued; retry later",
        );
        if let Ok(v) = HeaderValue::from_str(&state.retry_after_s.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    match answer.await {
        Ok(items) => Json(RecommendResponse {
            items: items
                .into_iter()
                .map(|s| Recommended {
                    item: state.item_tokens[s.item as usize].clone(),
                    score: s.score,
                })
                .collect(),
            unknown,
            model: state.model_label.clone(),
        })
        .into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the worker holding this request failed",
        ),
    }
}
