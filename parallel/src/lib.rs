//! Device mesh, segments, tensor and pipeline parallelism over `meshrec-comm`.
