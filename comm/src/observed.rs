//! `Observed`: a communicator wrapper that tells a `WaitProbe` when a call (or the wait of a
//! non-blocking one) starts and ends, on any engine. An elastic run's watchdog uses it to
//! tell a rank blocked on its peers from a rank that stopped making progress by itself.

use std::sync::Arc;

use crate::communicator::Communicator;
use crate::dtype::DType;
use crate::error::Result;
use crate::op::ReduceOp;
use crate::request::{Completion, Request};
use crate::stats::CommStats;

/// Told when a communicator call (or a request's wait) begins and ends. Calls nest only
/// through `split`; a probe counts, it does not pair.
pub trait WaitProbe: Send + Sync {
    fn enter(&self);
    fn leave(&self);
}

/// Calls `leave` when dropped, so an early return or unwinding still ends the wait.
struct Inside<'a>(&'a dyn WaitProbe);

impl<'a> Inside<'a> {
    fn new(probe: &'a dyn WaitProbe) -> Self {
        probe.enter();
        Self(probe)
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// `inner` with every call reported to `probe` (groups split from it too).
pub struct Observed {
    inner: Box<dyn Communicator>,
    probe: Arc<dyn WaitProbe>,
}

impl Observed {
    pub fn new(inner: Box<dyn Communicator>, probe: Arc<dyn WaitProbe>) -> Self {
        Self { inner, probe }
    }

    fn during<T>(&self, f: impl FnOnce(&dyn Communicator) -> T) -> T {
        let _inside = Inside::new(self.probe.as_ref());
        f(self.inner.as_ref())
    }

    fn request<T: Send + 'static>(&self, r: Result<Request<T>>) -> Result<Request<T>> {
        let request = r?;
        Ok(Request::pending(Box::new(ObservedWait {
            request: Some(request),
            probe: Arc::clone(&self.probe),
        })))
    }
}

/// A request whose blocking wait is reported to the probe.
struct ObservedWait<T> {
    request: Option<Request<T>>,
    probe: Arc<dyn WaitProbe>,
}

impl<T: Send> Completion<T> for ObservedWait<T> {
    fn poll(&mut self) -> Option<Result<T>> {
        let request = self.request.as_mut()?;
        if !request.test() {
            return None;
        }
        self.request.take().map(Request::wait)
    }

    fn wait(mut self: Box<Self>) -> Result<T> {
        let _inside = Inside::new(self.probe.as_ref());
        match self.request.take() {
            Some(r) => r.wait(),
            None => Err(crate::error::CommError::Internal(
                "an observed request was waited on twice".into(),
            )),
        }
    }
}

impl Communicator for Observed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.during(|c| c.all_reduce(buf, op))
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        self.during(|c| c.reduce_scatter(input, output, op))
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.during(|c| c.all_reduce_bytes(buf, dtype, op))
    }

    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.during(|c| c.reduce_scatter_bytes(input, output, dtype, op))
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        self.during(|c| c.all_gather(input, output))
    }

    fn all_gatherv_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.during(|c| c.all_gatherv_bytes(input))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.during(|c| c.broadcast(buf, root))
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.during(|c| c.broadcast_bytes(buf, root))
    }

    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> Result<()> {
        self.during(|c| c.send(dst, tag, data))
    }

    fn recv(&self, src: usize, tag: u32, buf: &mut [f32]) -> Result<()> {
        self.during(|c| c.recv(src, tag, buf))
    }

    fn send_bytes(&self, dst: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.during(|c| c.send_bytes(dst, tag, data))
    }

    fn recv_bytes(&self, src: usize, tag: u32) -> Result<Vec<u8>> {
        self.during(|c| c.recv_bytes(src, tag))
    }

    fn barrier(&self) -> Result<()> {
        self.during(|c| c.barrier())
    }

    fn iall_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Request<Vec<f32>>> {
        self.request(self.inner.iall_reduce(buf, op))
    }

    fn isend(&self, dst: usize, tag: u32, data: Vec<f32>) -> Result<Request<()>> {
        self.request(self.inner.isend(dst, tag, data))
    }

    fn irecv(&self, src: usize, tag: u32, len: usize) -> Result<Request<Vec<f32>>> {
        self.request(self.inner.irecv(src, tag, len))
    }

    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>> {
        let sub = self.during(|c| c.split(color, key))?;
        Ok(Box::new(Self::new(sub, Arc::clone(&self.probe))))
    }

    fn stats(&self) -> CommStats {
        self.inner.stats()
    }

    fn reset_stats(&self) {
        self.inner.reset_stats()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::LocalCluster;

    #[derive(Default)]
    struct Count {
        inside: AtomicUsize,
        entered: AtomicUsize,
        max_inside: AtomicUsize,
    }

    impl WaitProbe for Count {
        fn enter(&self) {
            let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_inside.fetch_max(now, Ordering::SeqCst);
            self.entered.fetch_add(1, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.inside.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn calls_and_request_waits_are_reported_and_results_unchanged() {
        let counts = LocalCluster::run(2, |c| {
            let probe = Arc::new(Count::default());
            let comm = Observed::new(Box::new(c), probe.clone());
            let mut v = [comm.rank() as f32 + 1.0];
            comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            assert_eq!(v[0], 3.0);
            let peer = 1 - comm.rank();
            let r = comm.irecv(peer, 7, 1).unwrap();
            comm.send(peer, 7, &[comm.rank() as f32]).unwrap();
            assert_eq!(r.wait().unwrap(), vec![peer as f32]);
            let sub = comm.split(0, comm.rank() as u32).unwrap();
            sub.barrier().unwrap();
            (
                probe.entered.load(Ordering::SeqCst),
                probe.inside.load(Ordering::SeqCst),
            )
        })
        .unwrap();
        // all_reduce, the irecv's wait, send, split, the split group's barrier.
        for (entered, inside) in counts {
            assert_eq!(entered, 5);
            assert_eq!(inside, 0, "every wait that began has ended");
        }
    }
}
