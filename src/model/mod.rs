//! The model: what a run measured (results), what the repository expects (the baseline), and
//! the figures, sizes and errors both are written in. It depends on nothing else in the crate.

pub mod baseline;
pub mod error;
pub mod figure;
pub mod results;
pub mod size;
