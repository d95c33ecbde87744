//! Comparing results with the baseline: regressions, improvements, new and missing tests.

use serde::Serialize;

use std::collections::BTreeMap;

use crate::model::baseline::{Baseline, Entry, Thresholds};
pub use crate::model::figure::Figure;
use crate::model::results::{Record, Results, Site};

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
    /// What the figure moved across the runs the baseline learned it from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<u64>,
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
/// It borrows from the results and the baseline: 100,000 of them cost no copies.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict<'a> {
    pub test: &'a str,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// (key, baseline, current) for each figure, in [`Figure::ALL`] order.
    pub figures: [(&'static str, Option<u64>, Option<u64>); 4],
    /// This test's entries in [`Comparison::regressions`].
    #[serde(skip)]
    pub regressions: std::ops::Range<usize>,
}

/// A line of a regressed test's report: a site at the peak, now and in the baseline, matched by
/// file and function (line numbers move with every edit above them).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SiteRow {
    pub file: String,
    pub function: String,
    /// The line now, else the baseline's.
    pub line: u32,
    pub baseline: Option<u64>,
    pub current: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Comparison<'a> {
    /// The environment the results were measured in.
    pub environment: String,
    pub regressions: Vec<Change>,
    pub improvements: Vec<Change>,
    /// Changes beyond the tolerance and the floor but within the figure's learned spread:
    /// not gated, and shown as noisy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub noisy: Vec<Change>,
    pub new_tests: Vec<String>,
    pub missing_tests: Vec<String>,
    /// Tests in the results without figures (crashed, or failed before measuring).
    pub unmeasured_tests: Vec<String>,
    pub unchanged: usize,
    /// For each regressed test, its sites at the peak beside the baseline's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sites: BTreeMap<String, Vec<SiteRow>>,
    #[serde(skip)]
    pub verdicts: Vec<Verdict<'a>>,
}

impl<'a> Comparison<'a> {
    pub fn has_regressions(&self) -> bool {
        !self.regressions.is_empty()
    }

    /// The tests whose sites the report shows: the regressed ones.
    pub fn regressed_tests(&self) -> impl Iterator<Item = &str> {
        self.sites.keys().map(String::as_str)
    }

    /// Sets a regressed test's sites now beside the baseline's (already in `sites`): the rows
    /// by file and function, largest now first, then the baseline's that are gone.
    pub fn add_current_sites(&mut self, test: &str, current: &[Site], peak: Option<u64>) {
        let Some(rows) = self.sites.get_mut(test) else {
            return;
        };
        for site in &crate::model::baseline::significant_sites(current.to_vec(), peak) {
            match rows
                .iter_mut()
                .find(|row| row.file == site.file && row.function == site.function)
            {
                Some(row) if row.current.is_none() => {
                    row.current = Some(site.bytes);
                    row.line = site.line;
                }
                // Two lines of one function: the second adds to the first.
                Some(row) => row.current = Some(row.current.unwrap_or(0) + site.bytes),
                None => rows.push(SiteRow {
                    file: site.file.clone(),
                    function: site.function.clone(),
                    line: site.line,
                    baseline: None,
                    current: Some(site.bytes),
                }),
            }
        }
        rows.sort_by(|a, b| b.current.cmp(&a.current).then(b.baseline.cmp(&a.baseline)));
    }

    /// Records a test's verdict, with the figures of whichever sides it has.
    fn add<R: Record>(
        &mut self,
        test: &'a str,
        status: Status,
        entry: Option<&Entry>,
        record: Option<&'a R>,
        regressions: std::ops::Range<usize>,
    ) {
        match status {
            Status::New => self.new_tests.push(test.to_owned()),
            Status::Missing => self.missing_tests.push(test.to_owned()),
            Status::Unmeasured => self.unmeasured_tests.push(test.to_owned()),
            Status::Passed | Status::Regressed => {}
        }
        let figures = Figure::ALL.map(|figure| {
            let base = entry.and_then(|e| e.figures[figure as usize]);
            (figure.key(), base, record.and_then(|r| r.figure(figure)))
        });
        self.verdicts.push(Verdict {
            test,
            status,
            file: record.and_then(|r| r.file()),
            line: record.and_then(|r| r.line()),
            figures,
            regressions,
        });
    }
}

/// Gates `results`, measured in `environment`, against the figures the baseline has for it
/// (see [`Baseline::figures_for`]).
pub fn compare<'a, R: Record>(
    results: &'a Results<R>,
    baseline: &'a Baseline,
    environment: &str,
    policy: &Policy,
) -> Comparison<'a> {
    let mut comparison = Comparison {
        environment: environment.to_owned(),
        verdicts: Vec::with_capacity(results.tests.len() + baseline.tests.len()),
        ..Comparison::default()
    };
    let figures = baseline.figures_for(environment).unwrap_or(environment);
    let (pairs, missing) = pair(results, baseline, figures);
    for (id, record, entry) in pairs {
        let current = |figure: Figure| record.figure(figure);
        let measured = record.figure(Figure::Peak).is_some();
        let (Some((thresholds, entry)), true) = (entry, measured) else {
            let entry = entry.map(|(_, entry)| entry);
            let status = if measured {
                Status::New
            } else {
                Status::Unmeasured
            };
            comparison.add(id, status, entry, Some(record), 0..0);
            continue;
        };
        let tolerance = thresholds.tolerance.unwrap_or(policy.tolerance);
        let bytes_floor = thresholds.floor.unwrap_or(policy.floor);
        let first_regression = comparison.regressions.len();
        let mut regressed = false;
        let mut changed = false;
        for &figure in &policy.gated {
            let (Some(base), Some(now)) = (entry.figures[figure as usize], current(figure)) else {
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
            let spread = entry.spreads[figure as usize];
            let record_change = Change {
                test: id.clone(),
                figure: figure.name(),
                baseline: base,
                current: now,
                change: change.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                change_percent: (base > 0).then(|| change as f64 * 100.0 / base as f64),
                tolerance_percent: tolerance * 100.0,
                floor,
                spread,
                file: record.file().map(str::to_owned),
                line: record.line(),
            };
            if change.unsigned_abs() <= u128::from(spread.unwrap_or(0)) {
                comparison.noisy.push(record_change);
                continue;
            }
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
            let rows = entry
                .sites
                .iter()
                .map(|site| SiteRow {
                    file: site.file.clone(),
                    function: site.function.clone(),
                    line: site.line,
                    baseline: Some(site.bytes),
                    current: None,
                })
                .collect();
            comparison.sites.insert(id.clone(), rows);
            Status::Regressed
        } else {
            Status::Passed
        };
        let regressions = first_regression..comparison.regressions.len();
        comparison.add(id, status, Some(entry), Some(record), regressions);
    }
    for (id, entry) in missing {
        comparison.add::<R>(id, Status::Missing, Some(entry), None, 0..0);
    }
    comparison
}

type Pair<'a, R> = (&'a String, &'a R, Option<(&'a Thresholds, &'a Entry)>);

/// Each test and benchmark of the results with its thresholds and its entry in the baseline's
/// `environment`, and the baseline entries that nothing in the results has. Tests and baseline
/// are both sorted by id, so one merge walk pairs them without a lookup each; the few benchmarks
/// are looked up.
fn pair<'a, R>(
    results: &'a Results<R>,
    baseline: &'a Baseline,
    environment: &str,
) -> (Vec<Pair<'a, R>>, Vec<(&'a String, &'a Entry)>) {
    let in_environment = |(id, test): (&'a String, &'a crate::model::baseline::Test)| {
        let entry = test.environments.get(environment)?;
        Some((id, (&test.thresholds, entry)))
    };
    let mut base = baseline.tests.iter().filter_map(in_environment).peekable();
    let mut missing = Vec::new();
    let mut pairs = Vec::with_capacity(results.tests.len() + results.benchmarks.len());
    for (id, record) in &results.tests {
        while let Some(earlier) = base.next_if(|(base_id, _)| *base_id < id) {
            missing.push(earlier);
        }
        let entry = base.next_if(|(base_id, _)| *base_id == id);
        pairs.push((id, record, entry.map(|(_, entry)| entry)));
    }
    missing.extend(base);
    missing.retain(|(id, _)| !results.benchmarks.contains_key(*id));
    for (id, record) in &results.benchmarks {
        let entry = baseline
            .tests
            .get_key_value(id)
            .and_then(in_environment)
            .map(|(_, entry)| entry);
        pairs.push((id, record, entry));
    }
    let missing = missing
        .into_iter()
        .map(|(id, (_, entry))| (id, entry))
        .collect();
    (pairs, missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::results::{GateRecord, TestRecord};
    use std::path::Path;

    fn sample<R: Record>(peak_a: u64, peak_b: u64) -> Results<R> {
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
        let baseline = baseline();
        // a: +20% and +2 MB: over both. b: +100% but +1000 B: under the floor.
        let results = sample::<TestRecord>(12_000_000, 2_000);
        let comparison = compare(&results, &baseline, "e", &policy);
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

        // The gate's lean records give the same verdicts.
        let lean = sample::<GateRecord>(12_000_000, 2_000);
        let lean = compare(&lean, &baseline, "e", &policy);
        assert_eq!(lean.regressions, comparison.regressions);
        assert_eq!(
            serde_json::to_value(&lean.verdicts).unwrap(),
            serde_json::to_value(&comparison.verdicts).unwrap()
        );

        // +5% and +500 KB: over the floor, under the tolerance.
        let results = sample::<GateRecord>(10_500_000, 1_000);
        assert!(!compare(&results, &baseline, "e", &policy).has_regressions());
    }

    #[test]
    fn improvements_and_per_test_thresholds() {
        let (results, baseline) = (sample::<GateRecord>(5_000_000, 1_000), baseline());
        let comparison = compare(&results, &baseline, "e", &Policy::default());
        assert_eq!(comparison.improvements.len(), 1);
        assert!(!comparison.has_regressions());

        let text = "schema = 1\n[tests.\"t.py::a\"]\npeak_bytes = 10000000\ntolerance = \"50%\"\n";
        let lenient = Baseline::parse(Path::new("b.toml"), text).unwrap();
        let results = sample::<GateRecord>(12_000_000, 1);
        assert!(!compare(&results, &lenient, "e", &Policy::default()).has_regressions());
    }

    #[test]
    fn a_change_within_the_learned_spread_is_noisy_not_a_regression() {
        let text = "schema = 1\n[tests.\"t.py::a\"]\npeak_bytes = 10000000\n\
            peak_bytes_spread = 3000000\n[tests.\"t.py::b\"]\npeak_bytes = 1000\n";
        let baseline = Baseline::parse(Path::new("b.toml"), text).unwrap();
        let results = sample::<GateRecord>(12_500_000, 1_000);
        let within = compare(&results, &baseline, "e", &Policy::default());
        assert!(!within.has_regressions());
        assert_eq!(within.noisy.len(), 1);
        assert_eq!(within.noisy[0].spread, Some(3_000_000));
        assert_eq!(within.unchanged, 2);
        let results = sample::<GateRecord>(13_500_000, 1_000);
        let beyond = compare(&results, &baseline, "e", &Policy::default());
        assert_eq!(beyond.regressions.len(), 1);
        assert!(beyond.noisy.is_empty());
    }

    #[test]
    fn each_environment_gates_against_its_own_figures_and_reports_sites() {
        let text = "schema = 2\n[tests.\"t.py::a\".\"cp311\"]\npeak_bytes = 1000000\n\
            sites = [\"t.py:4 build 900000\", \"t.py:9 gone 50000\"]\n\
            [tests.\"t.py::a\".\"cp312\"]\npeak_bytes = 3000000\n";
        let baseline = Baseline::parse(Path::new("b.toml"), text).unwrap();
        let results = sample::<GateRecord>(2_500_000, 1_000);
        let cp311 = compare(&results, &baseline, "cp311", &Policy::default());
        assert_eq!(cp311.regressions.len(), 1);
        assert_eq!(cp311.environment, "cp311");
        let cp312 = compare(&results, &baseline, "cp312", &Policy::default());
        assert!(!cp312.has_regressions());
        assert_eq!(cp312.improvements.len(), 1);
        assert_eq!(baseline.figures_for("cp313"), None);

        // The regressed test's sites now, matched to the baseline's by file and function.
        let mut cp311 = cp311;
        let now = [
            Site {
                file: "t.py".into(),
                line: 5,
                function: "build".into(),
                bytes: 2_400_000,
            },
            Site {
                file: "t.py".into(),
                line: 7,
                function: "fresh".into(),
                bytes: 200_000,
            },
            // Under 5% of the peak: not shown.
            Site {
                file: "t.py".into(),
                line: 8,
                function: "tiny".into(),
                bytes: 100_000,
            },
        ];
        cp311.add_current_sites("t.py::a", &now, Some(2_500_000));
        let rows = &cp311.sites["t.py::a"];
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].function.as_str(), rows[0].line), ("build", 5));
        assert_eq!(
            (rows[0].baseline, rows[0].current),
            (Some(900_000), Some(2_400_000))
        );
        assert_eq!(
            (rows[1].function.as_str(), rows[1].baseline),
            ("fresh", None)
        );
        assert_eq!((rows[2].function.as_str(), rows[2].current), ("gone", None));
    }

    #[test]
    fn only_gated_figures_count() {
        let policy = Policy {
            gated: vec![Figure::Leaked],
            ..Policy::default()
        };
        let (results, baseline) = (sample::<GateRecord>(99_000_000, 1_000), baseline());
        assert!(!compare(&results, &baseline, "e", &policy).has_regressions());
    }
}
