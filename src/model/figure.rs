//! The figures a test has and the gate compares: one list, which the results, the baseline and the
//! gate all name them by.

/// The figures a baseline records, in file order: (key, short name for --gate).
pub const FIGURES: [(&str, &str); 4] = [
    ("peak_bytes", "peak"),
    ("leaked_bytes", "leaked"),
    ("rss_peak_bytes", "rss"),
    ("allocations", "allocations"),
];

/// A figure that can be gated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    Peak,
    Leaked,
    Rss,
    Allocations,
}

impl Figure {
    pub const ALL: [Figure; 4] = [
        Figure::Peak,
        Figure::Leaked,
        Figure::Rss,
        Figure::Allocations,
    ];

    pub fn key(self) -> &'static str {
        FIGURES[self as usize].0
    }

    pub fn name(self) -> &'static str {
        FIGURES[self as usize].1
    }

    pub fn parse(name: &str) -> Option<Figure> {
        let name = name.trim();
        Figure::ALL
            .into_iter()
            .find(|f| f.name() == name || f.key() == name)
    }

    pub fn is_bytes(self) -> bool {
        self != Figure::Allocations
    }
}
