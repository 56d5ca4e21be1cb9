//! meshrec trainer library: config, runs, metrics, checkpoints.
