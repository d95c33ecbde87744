//! The gate: results against the baseline (compare), and every form the verdict is written in
//! (text, Markdown, JSON, JUnit, annotations; the HTML report). It reads the model, never the
//! engine.

pub mod compare;
pub mod html;
pub mod render;
