//! Comparing results with the baseline: regressions, improvements, new and missing tests.

use serde::Serialize;

use crate::baseline::{Baseline, Entry, FIGURES};
use crate::results::{Results, TestRecord};

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

    pub fn value(self, record: &TestRecord) -> Option<u64> {
        match self {
            Figure::Peak => record.peak_bytes,
            Figure::Leaked => record.leaked_bytes,
            Figure::Rss => record.rss_peak_bytes,
            Figure::Allocations => record.allocations,
        }
    }
}

/// How much a figure may grow before it is a regression.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Relative: 0.10 is 10%.
    pub tolerance: f64,
    /// Absolute, in bytes, so tiny tests do not flap.
    pub floor: u64,
    pub gated: Vec<Figure>,
}

/// The floor for the allocation count, which is not in bytes.
pub const ALLOCATIONS_FLOOR: u64 = 100;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            tolerance: 0.10,
            floor: 64 * 1024,
            gated: vec![Figure::Peak, Figure::Leaked],
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    pub test: String,
    pub figure: &'static str,
    pub baseline: u64,
    pub current: u64,
    pub change: i64,
    /// The change relative to the baseline, in percent (None when the baseline is 0).
    pub change_percent: Option<f64>,
    pub tolerance_percent: f64,
    pub floor: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passed,
    Regressed,
    New,
    Missing,
    Unmeasured,
}

/// One test's verdict, with its figures (baseline, current) for reports and JUnit properties.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub test: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    pub figures: Vec<(&'static str, Option<u64>, Option<u64>)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Comparison {
    pub regressions: Vec<Change>,
    pub improvements: Vec<Change>,
    pub new_tests: Vec<String>,
    pub missing_tests: Vec<String>,
    /// Tests in the results without figures (crashed, or failed before measuring).
    pub unmeasured_tests: Vec<String>,
    pub unchanged: usize,
    #[serde(skip)]
    pub verdicts: Vec<Verdict>,
}

impl Comparison {
    pub fn has_regressions(&self) -> bool {
        !self.regressions.is_empty()
    }

    /// Records a test's verdict, with the figures of whichever sides it has.
    fn add(
        &mut self,
        test: &str,
        status: Status,
        entry: Option<&Entry>,
        record: Option<&TestRecord>,
    ) {
        match status {
            Status::New => self.new_tests.push(test.to_owned()),
            Status::Missing => self.missing_tests.push(test.to_owned()),
            Status::Unmeasured => self.unmeasured_tests.push(test.to_owned()),
            Status::Passed | Status::Regressed => {}
        }
        let figures = Figure::ALL
            .iter()
            .map(|&figure| {
                let base = entry.and_then(|e| e.figures.get(figure.key()).copied());
                (figure.key(), base, record.and_then(|r| figure.value(r)))
            })
            .collect();
        self.verdicts.push(Verdict {
            test: test.to_owned(),
            status,
            file: record.and_then(|r| r.file.clone()),
            line: record.and_then(|r| r.line),
            figures,
        });
    }
}

pub fn compare(results: &Results, baseline: &Baseline, policy: &Policy) -> Comparison {
    let mut comparison = Comparison::default();
    let mut seen = std::collections::HashSet::with_capacity(results.tests.len());
    for (id, record) in results.entries() {
        seen.insert(id.as_str());
        let current = |figure: Figure| figure.value(record);
        let entry = baseline.tests.get(id);
        let (Some(entry), Some(_)) = (entry, record.peak_bytes) else {
            let status = if record.peak_bytes.is_some() {
                Status::New
            } else {
                Status::Unmeasured
            };
            comparison.add(id, status, entry, Some(record));
            continue;
        };
        let tolerance = entry.thresholds.tolerance.unwrap_or(policy.tolerance);
        let bytes_floor = entry.thresholds.floor.unwrap_or(policy.floor);
        let mut regressed = false;
        let mut changed = false;
        for &figure in &policy.gated {
            let (Some(base), Some(now)) =
                (entry.figures.get(figure.key()).copied(), current(figure))
            else {
                continue;
            };
            let floor = if figure.is_bytes() {
                bytes_floor
            } else {
                ALLOCATIONS_FLOOR
            };
            let change = now as i128 - base as i128;
            let beyond_tolerance = change.unsigned_abs() as f64 > base as f64 * tolerance;
            let beyond_floor = change.unsigned_abs() > u128::from(floor);
            if !(beyond_tolerance && beyond_floor) {
                continue;
            }
            let record_change = Change {
                test: id.clone(),
                figure: figure.name(),
                baseline: base,
                current: now,
                change: change.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                change_percent: (base > 0).then(|| change as f64 * 100.0 / base as f64),
                tolerance_percent: tolerance * 100.0,
                floor,
                file: record.file.clone(),
                line: record.line,
            };
            changed = true;
            if change > 0 {
                regressed = true;
                comparison.regressions.push(record_change);
            } else {
                comparison.improvements.push(record_change);
            }
        }
        if !changed {
            comparison.unchanged += 1;
        }
        let status = if regressed {
            Status::Regressed
        } else {
            Status::Passed
        };
        comparison.add(id, status, Some(entry), Some(record));
    }
    for (id, entry) in &baseline.tests {
        if !seen.contains(id.as_str()) {
            comparison.add(id, Status::Missing, Some(entry), None);
        }
    }
    comparison
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn results(peak_a: u64, peak_b: u64) -> Results {
        let text = format!(
            r#"{{"schema": 1, "tests": {{
            "t.py::a": {{"outcome": "passed", "file": "t.py", "line": 3, "peak_bytes": {peak_a}, "leaked_bytes": 0}},
            "t.py::b": {{"outcome": "passed", "peak_bytes": {peak_b}, "leaked_bytes": 0}},
            "t.py::new": {{"outcome": "passed", "peak_bytes": 1}}}}}}"#
        );
        Results::parse(Path::new("r.json"), &text).unwrap()
    }

    fn baseline() -> Baseline {
        let text = "schema = 1\n[tests.\"t.py::a\"]\npeak_bytes = 10000000\nleaked_bytes = 0\n\
            [tests.\"t.py::b\"]\npeak_bytes = 1000\nleaked_bytes = 0\n\
            [tests.\"t.py::gone\"]\npeak_bytes = 5\n";
        Baseline::parse(Path::new("b.toml"), text).unwrap()
    }

    #[test]
    fn regression_needs_both_tolerance_and_floor() {
        let policy = Policy::default();
        // a: +20% and +2 MB: over both. b: +100% but +1000 B: under the floor.
        let comparison = compare(&results(12_000_000, 2_000), &baseline(), &policy);
        assert_eq!(comparison.regressions.len(), 1);
        let regression = &comparison.regressions[0];
        assert_eq!(
            (regression.test.as_str(), regression.figure),
            ("t.py::a", "peak")
        );
        assert_eq!(regression.change, 2_000_000);
        assert_eq!(regression.change_percent, Some(20.0));
        assert_eq!(regression.line, Some(3));
        assert_eq!(comparison.new_tests, vec!["t.py::new"]);
        assert_eq!(comparison.missing_tests, vec!["t.py::gone"]);
        assert_eq!(comparison.unchanged, 1);

        // +5% and +500 KB: over the floor, under the tolerance.
        assert!(!compare(&results(10_500_000, 1_000), &baseline(), &policy).has_regressions());
    }

    #[test]
    fn improvements_and_per_test_thresholds() {
        let comparison = compare(&results(5_000_000, 1_000), &baseline(), &Policy::default());
        assert_eq!(comparison.improvements.len(), 1);
        assert!(!comparison.has_regressions());

        let text = "schema = 1\n[tests.\"t.py::a\"]\npeak_bytes = 10000000\ntolerance = \"50%\"\n";
        let lenient = Baseline::parse(Path::new("b.toml"), text).unwrap();
        assert!(!compare(&results(12_000_000, 1), &lenient, &Policy::default()).has_regressions());
    }

    #[test]
    fn only_gated_figures_count() {
        let policy = Policy {
            gated: vec![Figure::Leaked],
            ..Policy::default()
        };
        assert!(!compare(&results(99_000_000, 1_000), &baseline(), &policy).has_regressions());
    }
}
