//! Shared by the integration tests (and, through `#[path]`, by `examples/pipeline_bench.rs`).

pub mod harness;
pub mod test_store;
