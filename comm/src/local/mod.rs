//! The `local` engine: N ranks as N threads of one process, talking over crossbeam channels.
//!
//! # Design
//! * Every group (the cluster, and every group `split` makes) has three *lanes*, each a full
//!   matrix of unbounded point-to-point channels: one for blocking collectives (driven by the
//!   caller's thread), one for non-blocking collectives (driven by the communicator's
//!   progress thread, started on the first `iall_reduce`), one for tagged send/recv. Within a
//!   lane a pair of ranks sees messages in order, so collectives need no central lock and no
//!   matching beyond a sequence number.
//! * All-reduce and reduce-scatter of large buffers run *in place* (`in_place`, from
//!   `LocalConfig::in_place_threshold_bytes`): the ranks share one address space, so each
//!   publishes its buffer on its lane's `board` for the duration of the collective, reduces
//!   its own chunk straight from the peers' buffers in cache-sized blocks, in rank order, and
//!   writes the result into every buffer: one read of each input and one write of each
//!   output, and no data in messages (which only carry the handshake and the checks). The
//!   board's pin / revoke protocol keeps every path safe: no rank touches a buffer whose
//!   owner has left the collective, and no rank leaves while a peer may touch its buffer.
//! * Below that, all-reduce runs recursive doubling for small buffers and a ring
//!   (reduce-scatter then all-gather) from `ring_threshold_bytes` (measured by the `comm`
//!   benchmark); either can be forced (`AllReduceChoice`). The ring is cut into segments
//!   (`segment_bytes`) that pipeline around the ring. Message buffers are not copied per
//!   hop: a segment's buffer is reduced into in place and forwarded, the last reduction
//!   writes the result to both the rank's buffer and the message, which then travels on as
//!   the all-gather message, and the rank that retires it keeps it in a pool for the next
//!   call. Every algorithm leaves every rank with bit-identical results.
//! * Reductions are generic over the element type (`f32`, `i64`, `f16`, `bf16`): the same
//!   in-place, ring and recursive-doubling algorithms run on the typed kernels of
//!   `crate::reduce`, with messages and pooled buffers of that type; the byte interface only
//!   picks the type.
//! * All-gather, ragged all-gather and broadcast share one immutable copy (`Arc`) of each
//!   payload with all receivers (a single hop: the fastest schedule in shared memory).
//! * Every message carries the sender's operation, sequence number and buffer length, so
//!   mismatched lengths or collectives are reported (`SizeMismatch`, `CollectiveMismatch`).
//! * Failures: a rank that fails a collective sends an abort carrying its error to all peers,
//!   so nobody waits for it; a dropped peer shows as a closed channel (`PeerLost`); a silent
//!   peer as `Timeout` after `LocalConfig::timeout`; a rank that panics while holding its
//!   communicator poisons the whole cluster (every group), waking every waiting rank.
//!
//! # Files
//! Each file is one algorithm or one mechanism; they form a DAG (this file only declares
//! and re-exports). Bottom up: `config` (settings), `shared` (cluster-wide state,
//! poisoning), `board` (buffers published for in-place access: the engine's only shared
//! pointers), `lane` (collective transport: checked messages, aborts, buffer pool, its
//! board), the algorithms on a lane (`in_place`, `ring`, `recursive_doubling`, `gather`,
//! `broadcast`, `barrier`),
//! `reduction` (algorithm choice, byte interface), `p2p` (tagged mailboxes), `progress`
//! (the non-blocking all-reduce thread), `communicator` (groups, `split`, the
//! `Communicator` impl) and `cluster` (creating and running ranks).

mod barrier;
mod board;
mod broadcast;
mod cluster;
mod communicator;
mod config;
mod gather;
mod in_place;
mod lane;
mod p2p;
mod progress;
mod recursive_doubling;
mod reduction;
mod ring;
mod shared;

pub use cluster::{ClusterError, LocalCluster};
pub use communicator::LocalCommunicator;
pub use config::{AllReduceChoice, LocalConfig};
pub use shared::AbortHandle;
