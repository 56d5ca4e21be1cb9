//! `Request<T>`: the handle of a non-blocking operation (`wait` / `test`), engine-agnostic.

use crate::error::Result;

/// What an engine implements for one outstanding operation.
pub trait Completion<T>: Send {
    /// Checks without blocking; `Some` once the operation has finished (successfully or not).
    fn poll(&mut self) -> Option<Result<T>>;
    /// Blocks until the operation has finished (bounded by the engine's timeout).
    fn wait(self: Box<Self>) -> Result<T>;
}

enum State<T> {
    Done(Result<T>),
    Pending(Box<dyn Completion<T>>),
}

/// Handle of a non-blocking operation. `test` polls, `wait` blocks and yields the result.
/// Dropping a pending request waits for it (an engine may still be using its buffers).
#[must_use = "a request must be waited on to get its result and any error"]
pub struct Request<T> {
    state: Option<State<T>>,
}

impl<T> Request<T> {
    /// A request that has already finished.
    pub fn ready(result: Result<T>) -> Self {
        Self {
            state: Some(State::Done(result)),
        }
    }

    /// A request an engine completes later.
    pub fn pending(completion: Box<dyn Completion<T>>) -> Self {
        Self {
            state: Some(State::Pending(completion)),
        }
    }

    /// `true` once the operation has finished, so that `wait` returns without blocking.
    pub fn test(&mut self) -> bool {
        match self.state.take() {
            Some(State::Pending(mut c)) => match c.poll() {
                Some(r) => {
                    self.state = Some(State::Done(r));
                    true
                }
                None => {
                    self.state = Some(State::Pending(c));
                    false
                }
            },
            other => {
                self.state = other;
                true
            }
        }
    }

    /// Blocks until the operation finishes and returns its result.
    pub fn wait(mut self) -> Result<T> {
        match self.state.take() {
            Some(State::Done(r)) => r,
            Some(State::Pending(c)) => c.wait(),
            None => unreachable!("a request's state is only taken by wait, which consumes it"),
        }
    }
}

impl<T> Drop for Request<T> {
    fn drop(&mut self) {
        if let Some(State::Pending(c)) = self.state.take() {
            // The error (if any) has nowhere to go; completing is what matters here.
            let _ = c.wait();
        }
    }
}

impl<T> std::fmt::Debug for Request<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match &self.state {
            Some(State::Done(Ok(_))) => "done",
            Some(State::Done(Err(_))) => "failed",
            Some(State::Pending(_)) => "pending",
            None => "taken",
        };
        f.debug_struct("Request").field("state", &s).finish()
    }
}
