//! The `meshrec` command line.
fn main() {}
