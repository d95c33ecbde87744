//! The baseline committed to the repo: TOML, one table per test, sizes as integer bytes, sorted,
//! so unchanged results give a byte-identical file and a change reads as a small diff.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::results::Results;
use crate::size;

pub const SCHEMA: i64 = 1;

/// The figures a baseline records, in file order: (key, short name for --gate).
pub const FIGURES: [(&str, &str); 4] = [
    ("peak_bytes", "peak"),
    ("leaked_bytes", "leaked"),
    ("rss_peak_bytes", "rss"),
    ("allocations", "allocations"),
];

/// A tolerance (relative) and a floor (absolute) as written in the file, both optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thresholds {
    pub tolerance: Option<f64>,
    pub floor: Option<u64>,
    tolerance_text: Option<String>,
    floor_text: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    pub figures: BTreeMap<&'static str, u64>,
    pub thresholds: Thresholds,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Baseline {
    pub defaults: Thresholds,
    pub tests: BTreeMap<String, Entry>,
}

fn thresholds(path: &Path, table: &toml::Table, at: &str) -> Result<Thresholds> {
    let mut thresholds = Thresholds::default();
    if let Some(value) = table.get("tolerance") {
        let text = value.as_str().ok_or_else(|| {
            Error::invalid(
                path,
                format!("key {at}tolerance: write a percentage string, e.g. \"10%\""),
            )
        })?;
        let fraction = size::parse_percent(text)
            .map_err(|e| Error::invalid(path, format!("key {at}tolerance: {e}")))?;
        thresholds.tolerance = Some(fraction);
        thresholds.tolerance_text = Some(text.to_owned());
    }
    if let Some(value) = table.get("floor") {
        let text = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(bytes) => bytes.to_string(),
            _ => {
                return Err(Error::invalid(
                    path,
                    format!("key {at}floor: write a size, e.g. \"64 KiB\""),
                ));
            }
        };
        let bytes = size::parse_size(&text)
            .map_err(|e| Error::invalid(path, format!("key {at}floor: {e}")))?;
        thresholds.floor = Some(bytes);
        thresholds.floor_text = Some(text);
    }
    Ok(thresholds)
}

/// A TOML basic string, usable as a key: always `"..."`, whatever the text holds (the toml
/// crate's own rendering picks multi-line or literal forms, which are not keys).
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Baseline {
    pub fn parse(path: &Path, text: &str) -> Result<Baseline> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Toml {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        match table.get("schema") {
            Some(toml::Value::Integer(SCHEMA)) => {}
            Some(other) => {
                return Err(Error::invalid(
                    path,
                    format!("key schema: version {other} is not one this memgauge reads ({SCHEMA}); upgrade memgauge"),
                ));
            }
            None => {
                return Err(Error::invalid(
                    path,
                    "no schema key: is this a memgauge baseline?",
                ))
            }
        }
        let mut baseline = Baseline::default();
        if let Some(defaults) = table.get("defaults") {
            let defaults = defaults
                .as_table()
                .ok_or_else(|| Error::invalid(path, "key defaults: must be a table"))?;
            baseline.defaults = thresholds(path, defaults, "defaults.")?;
        }
        let tests = match table.get("tests") {
            None => return Ok(baseline),
            Some(toml::Value::Table(tests)) => tests,
            Some(_) => return Err(Error::invalid(path, "key tests: must be a table of tests")),
        };
        for (id, value) in tests {
            let at = format!("tests.{}.", quoted(id));
            let test = value.as_table().ok_or_else(|| {
                Error::invalid(path, format!("key {}: must be a table", quoted(id)))
            })?;
            let mut entry = Entry {
                thresholds: thresholds(path, test, &at)?,
                ..Entry::default()
            };
            for (key, value) in test {
                if key == "tolerance" || key == "floor" {
                    continue;
                }
                let Some(&(figure, _)) = FIGURES.iter().find(|(name, _)| name == key) else {
                    let known: Vec<_> = FIGURES.iter().map(|f| f.0).collect();
                    return Err(Error::invalid(
                        path,
                        format!(
                            "key {at}{key}: unknown; a test has {}, tolerance and floor",
                            known.join(", ")
                        ),
                    ));
                };
                let bytes = value
                    .as_integer()
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| {
                        Error::invalid(path, format!("key {at}{key}: must be a whole number ≥ 0"))
                    })?;
                entry.figures.insert(figure, bytes);
            }
            baseline.tests.insert(id.clone(), entry);
        }
        Ok(baseline)
    }

    /// Reads the baseline; a missing file is an empty baseline.
    pub fn load_or_empty(path: &Path) -> Result<(Baseline, Option<String>)> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Self::parse(path, &text)?, Some(text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Baseline::default(), None)),
            Err(source) => Err(Error::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// This baseline with the figures of every passed test in `results`.
    pub fn updated(&self, results: &Results, prune: bool) -> Baseline {
        let mut next = self.clone();
        if prune {
            next.tests.retain(|id, _| {
                results.tests.contains_key(id) || results.benchmarks.contains_key(id)
            });
        }
        for (id, record) in results.entries() {
            if record.outcome != "passed" || record.peak_bytes.is_none() {
                continue;
            }
            let values = [
                record.peak_bytes,
                record.leaked_bytes,
                record.rss_peak_bytes,
                record.allocations,
            ];
            let entry = next.tests.entry(id.clone()).or_default();
            entry.figures.clear();
            for ((figure, _), value) in FIGURES.iter().zip(values) {
                if let Some(value) = value {
                    entry.figures.insert(figure, value);
                }
            }
        }
        next
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# memgauge baseline: `memgauge baseline update` writes it; review its diffs like code.\n");
        out.push_str("# Sizes are bytes. A test may set its own tolerance = \"20%\" and floor = \"1 MiB\".\n");
        let _ = writeln!(out, "schema = {SCHEMA}");
        let write_thresholds = |out: &mut String, t: &Thresholds| {
            if let Some(text) = &t.tolerance_text {
                let _ = writeln!(out, "tolerance = {}", quoted(text));
            }
            if let Some(text) = &t.floor_text {
                let _ = writeln!(out, "floor = {}", quoted(text));
            }
        };
        if self.defaults != Thresholds::default() {
            out.push_str("\n[defaults]\n");
            write_thresholds(&mut out, &self.defaults);
        }
        for (id, entry) in &self.tests {
            let _ = write!(out, "\n[tests.{}]\n", quoted(id));
            for (figure, _) in FIGURES {
                if let Some(value) = entry.figures.get(figure) {
                    let _ = writeln!(out, "{figure} = {value}");
                }
            }
            write_thresholds(&mut out, &entry.thresholds);
        }
        out
    }
}

/// A unified diff of two baseline texts, for review.
pub fn diff(path: &Path, old: &str, new: &str) -> String {
    let name = path.display().to_string();
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(2)
        .header(&format!("a/{name}"), &format!("b/{name}"))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        Results::parse(
            Path::new("r.json"),
            r#"{"schema": 1, "tests": {
            "b.py::t[\"x\" 'q' \\ $HOME `y` é\n]": {"outcome": "passed", "peak_bytes": 10, "leaked_bytes": 1, "allocations": 3},
            "a.py::t": {"outcome": "passed", "peak_bytes": 20, "leaked_bytes": 0, "rss_peak_bytes": 4096},
            "a.py::failed": {"outcome": "failed", "peak_bytes": 99}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn renders_sorted_and_round_trips_any_test_id() {
        let baseline = Baseline::default().updated(&results(), false);
        let text = baseline.render();
        assert!(
            text.find("a.py::t").unwrap() < text.find("b.py::t").unwrap(),
            "{text}"
        );
        assert!(!text.contains("a.py::failed"));
        let parsed = Baseline::parse(Path::new("b.toml"), &text).unwrap();
        assert_eq!(parsed, baseline);
        assert_eq!(parsed.render(), text);
        assert_eq!(
            parsed.tests["b.py::t[\"x\" 'q' \\ $HOME `y` é\n]"].figures["allocations"],
            3
        );
    }

    #[test]
    fn keeps_per_test_thresholds_and_prunes_on_request() {
        let text = "schema = 1\n[defaults]\ntolerance = \"5%\"\n\
            [tests.\"a.py::t\"]\npeak_bytes = 1\nfloor = \"1 MiB\"\n[tests.\"gone.py::t\"]\npeak_bytes = 5\n";
        let baseline = Baseline::parse(Path::new("b.toml"), text).unwrap();
        assert_eq!(baseline.defaults.tolerance, Some(0.05));
        let kept = baseline.updated(&results(), false);
        assert_eq!(kept.tests["a.py::t"].thresholds.floor, Some(1 << 20));
        assert_eq!(kept.tests["a.py::t"].figures["peak_bytes"], 20);
        assert!(kept.tests.contains_key("gone.py::t"));
        assert!(!baseline
            .updated(&results(), true)
            .tests
            .contains_key("gone.py::t"));
        assert!(kept.render().contains("floor = \"1 MiB\""));
    }

    #[test]
    fn errors_name_the_key() {
        let error = |text: &str| {
            Baseline::parse(Path::new("b.toml"), text)
                .unwrap_err()
                .to_string()
        };
        assert!(error("schema = 1\n[tests.\"a\"]\npeak_bytes = -3\n")
            .contains("key tests.\"a\".peak_bytes"));
        assert!(error("schema = 1\n[tests.\"a\"]\npeek = 3\n")
            .contains("key tests.\"a\".peek: unknown"));
        assert!(error("schema = 1\n[tests.\"a\"]\nfloor = \"3 XB\"\n").contains("unknown unit"));
        assert!(error("schema = 2\n").contains("key schema: version 2"));
        assert!(error("schema = [\n").starts_with("b.toml: invalid TOML"));
        assert!(error("[tests]\n").contains("no schema key"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let _ = Baseline::parse(Path::new("fuzz.toml"), &text);
        }

        #[test]
        fn never_panics_on_toml_shaped_text(text in r#"schema = 1\n(\[tests\."[a-z]{1,4}"\]\n([a-z_]{1,14} = (-?[0-9]{1,20}|"[0-9a-zA-Z %]{0,8}")\n){0,4}){0,3}"#) {
            let _ = Baseline::parse(Path::new("fuzz.toml"), &text);
        }
    }
}
