//! Developer commands: data, demo, bench, ci.
fn main() {}
