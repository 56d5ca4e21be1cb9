//! The progress thread of non-blocking all-reduces: started on a communicator's first
//! `iall_reduce`, it owns a lane of its own (so its messages never interleave with the
//! caller's blocking collectives) and runs the jobs in the order they were started.

use crossbeam_channel::{unbounded, Receiver, Sender, TryRecvError};

use super::lane::Lane;
use super::reduction;
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::request::{Completion, Request};
use crate::stats::OpKind;

struct Job {
    buf: Vec<f32>,
    op: ReduceOp,
    reply: Sender<Result<Vec<f32>>>,
}

/// The progress thread of one communicator, started lazily.
pub(super) struct Worker(State);

enum State {
    Idle(Box<Lane>),
    Running(Sender<Job>),
    Failed,
}

fn worker_gone() -> CommError {
    CommError::Internal("the progress thread ended before answering".to_owned())
}

impl Worker {
    /// A worker that will run its jobs on `lane` once started.
    pub(super) fn new(lane: Lane) -> Self {
        Self(State::Idle(Box::new(lane)))
    }

    /// Hands `buf` to the progress thread (starting it, named `name`, if needed).
    pub(super) fn submit(
        &mut self,
        name: impl FnOnce() -> String,
        buf: Vec<f32>,
        op: ReduceOp,
    ) -> Result<Request<Vec<f32>>> {
        let tx = self.start(name)?;
        let (reply, rx) = crossbeam_channel::bounded(1);
        tx.send(Job { buf, op, reply }).map_err(|_| worker_gone())?;
        Ok(Request::pending(Box::new(JobCompletion { rx })))
    }

    fn start(&mut self, name: impl FnOnce() -> String) -> Result<Sender<Job>> {
        if let State::Running(tx) = &self.0 {
            return Ok(tx.clone());
        }
        let State::Idle(mut lane) = std::mem::replace(&mut self.0, State::Failed) else {
            return Err(CommError::Internal(
                "the progress thread could not be started".into(),
            ));
        };
        let (tx, rx) = unbounded::<Job>();
        std::thread::Builder::new()
            .name(name())
            .spawn(move || {
                for job in rx {
                    let Job { mut buf, op, reply } = job;
                    let r = lane
                        .run(OpKind::AllReduce, |l| {
                            reduction::all_reduce(l, &mut buf, op)
                        })
                        .map(|()| buf);
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| CommError::Internal(format!("spawning the progress thread: {e}")))?;
        self.0 = State::Running(tx.clone());
        Ok(tx)
    }
}

struct JobCompletion {
    rx: Receiver<Result<Vec<f32>>>,
}

impl Completion<Vec<f32>> for JobCompletion {
    fn poll(&mut self) -> Option<Result<Vec<f32>>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(worker_gone())),
        }
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        // The worker answers every job: each of its waits is bounded by the timeout.
        self.rx.recv().unwrap_or_else(|_| Err(worker_gone()))
    }
}
