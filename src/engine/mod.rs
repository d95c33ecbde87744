//! The measurement engine: the allocator hooks and everything unsafe (`ffi/`), the accounting
//! (`tracker.rs`, `blocks.rs`), a measurement (`scope.rs`), the line profiler (`lines.rs`), and
//! the process's RSS (`rss.rs`, `proc.rs`).

pub mod blocks;
pub mod ffi;
pub mod proc;
pub mod rss;
pub mod tracker;

#[cfg(feature = "python")]
pub(crate) mod lines;
#[cfg(feature = "python")]
pub mod scope;
