//! A mesh axis group that names its peers: a communicator wrapper whose errors say which
//! world rank, at which mesh coordinates, a group rank is ("pp rank 1 is world rank 5
//! (dp1·tp0·pp1)"), so that a lost rank is recognisable from every survivor's report
//! rather than as each group's own number.

use meshrec_comm::{CommError, CommStats, Communicator, DType, ReduceOp, Request};
use meshrec_pipeline::{Coord, Mesh};

type Result<T> = std::result::Result<T, CommError>;

/// `inner`, a group of the mesh whose rank `r` is world rank `members[r]`.
pub struct NamedGroup {
    inner: Box<dyn Communicator>,
    name: String,
    mesh: Mesh,
    members: Vec<usize>,
}

impl NamedGroup {
    pub fn new(
        inner: Box<dyn Communicator>,
        name: impl Into<String>,
        mesh: Mesh,
        members: Vec<usize>,
    ) -> Self {
        Self {
            inner,
            name: name.into(),
            mesh,
            members,
        }
    }

    fn coord(&self, world: usize) -> Coord {
        self.mesh.coord(world)
    }

    /// `e` with the world ranks and coordinates of the group ranks it mentions.
    fn named(&self, e: CommError) -> CommError {
        let parts: Vec<String> = e
            .peer_ranks()
            .into_iter()
            .filter_map(|r| {
                let world = *self.members.get(r)?;
                Some(format!(
                    "{} rank {r} is world rank {world} ({})",
                    self.name,
                    self.coord(world)
                ))
            })
            .collect();
        if parts.is_empty() {
            return e;
        }
        CommError::InGroup {
            group: parts.join(", "),
            source: Box::new(e),
        }
    }

    fn wrap<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| self.named(e))
    }
}

impl Communicator for NamedGroup {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.wrap(self.inner.all_reduce(buf, op))
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        self.wrap(self.inner.reduce_scatter(input, output, op))
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.wrap(self.inner.all_reduce_bytes(buf, dtype, op))
    }

    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.wrap(self.inner.reduce_scatter_bytes(input, output, dtype, op))
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        self.wrap(self.inner.all_gather(input, output))
    }

    fn all_gatherv_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.wrap(self.inner.all_gatherv_bytes(input))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.wrap(self.inner.broadcast(buf, root))
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.wrap(self.inner.broadcast_bytes(buf, root))
    }

    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> Result<()> {
        self.wrap(self.inner.send(dst, tag, data))
    }

    fn recv(&self, src: usize, tag: u32, buf: &mut [f32]) -> Result<()> {
        self.wrap(self.inner.recv(src, tag, buf))
    }

    fn send_bytes(&self, dst: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.wrap(self.inner.send_bytes(dst, tag, data))
    }

    fn recv_bytes(&self, src: usize, tag: u32) -> Result<Vec<u8>> {
        self.wrap(self.inner.recv_bytes(src, tag))
    }

    fn barrier(&self) -> Result<()> {
        self.wrap(self.inner.barrier())
    }

    fn iall_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Request<Vec<f32>>> {
        self.wrap(self.inner.iall_reduce(buf, op))
    }

    fn isend(&self, dst: usize, tag: u32, data: Vec<f32>) -> Result<Request<()>> {
        self.wrap(self.inner.isend(dst, tag, data))
    }

    fn irecv(&self, src: usize, tag: u32, len: usize) -> Result<Request<Vec<f32>>> {
        self.wrap(self.inner.irecv(src, tag, len))
    }

    /// The sub-group, naming its peers too: its members' world ranks are learnt by one
    /// all-gather over it.
    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>> {
        let sub = self.wrap(self.inner.split(color, key))?;
        let me = self.members.get(self.rank()).copied().unwrap_or(usize::MAX) as u64;
        let all = self.wrap(sub.all_gatherv_bytes(&me.to_le_bytes()))?;
        let members = all
            .iter()
            .map(|b| {
                let bytes: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                    CommError::Internal("split: a member sent no world rank".into())
                })?;
                Ok(u64::from_le_bytes(bytes) as usize)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(Self::new(
            sub,
            self.name.clone(),
            self.mesh,
            members,
        )))
    }

    fn stats(&self) -> CommStats {
        self.inner.stats()
    }

    fn reset_stats(&self) {
        self.inner.reset_stats()
    }
}
