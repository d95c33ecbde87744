//! The baseline committed to the repo: TOML, one table per test, sizes as integer bytes, sorted,
//! so unchanged results give a byte-identical file and a change reads as a small diff.

use std::borrow::Cow;
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
    /// By the index in [`FIGURES`].
    pub figures: [Option<u64>; FIGURES.len()],
    /// How far each figure moved across the runs `baseline update` learned it from (largest
    /// minus smallest), written as `<figure>_spread`; compare allows that much, and says so.
    pub spreads: [Option<u64>; FIGURES.len()],
    pub thresholds: Thresholds,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Baseline {
    pub defaults: Thresholds,
    pub tests: BTreeMap<String, Entry>,
}

/// A baseline document as either reader sees it: the TOML crate for any file, or the fast reader
/// for the canonical layout `render` writes (100,000 tests read in tens of milliseconds, where a
/// full TOML parse takes about a second and 200 MB). One validation serves both.
#[derive(Debug, Clone, PartialEq)]
enum Raw<'a> {
    Integer(i64),
    String(Cow<'a, str>),
    Table(Vec<(Cow<'a, str>, Raw<'a>)>),
    /// Any other TOML value, in its TOML form (for messages).
    Other(String),
}

impl<'a> Raw<'a> {
    fn get(&self, key: &str) -> Option<&Raw<'a>> {
        match self {
            Raw::Table(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn from_toml(value: toml::Value) -> Raw<'static> {
        match value {
            toml::Value::Integer(value) => Raw::Integer(value),
            toml::Value::String(text) => Raw::String(Cow::Owned(text)),
            toml::Value::Table(table) => Raw::Table(
                table
                    .into_iter()
                    .map(|(k, v)| (Cow::Owned(k), Raw::from_toml(v)))
                    .collect(),
            ),
            other => Raw::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Raw::Integer(value) => write!(f, "{value}"),
            Raw::String(text) => f.write_str(&quoted(text)),
            Raw::Table(_) => f.write_str("a table"),
            Raw::Other(text) => f.write_str(text),
        }
    }
}

/// The canonical layout, line by line: comments, `schema = 1`, `[defaults]`, `[tests."id"]`,
/// and `key = 123` or `key = "text"`. Each test is checked and kept as soon as its table ends,
/// so nothing of the file is held but the baseline itself. Anything else (other spacing, inline
/// tables, dotted keys, a repeated key, CRLF) and any invalid value answer `None`, and the TOML
/// crate reads the file instead (and words the error).
fn read_canonical(path: &Path, text: &str) -> Option<Baseline> {
    type Keys<'a> = Vec<(Cow<'a, str>, Raw<'a>)>;
    let mut root: Keys = Vec::new();
    let mut defaults: Option<Keys> = None;
    let mut test: Option<(Cow<str>, Keys)> = None;
    let mut entries = Vec::new();
    let mut finish = |test: &mut Option<(Cow<str>, Keys)>| -> Option<()> {
        if let Some((id, keys)) = test.take() {
            let entry = entry(path, &id, &Raw::Table(keys)).ok()?;
            entries.push((id.into_owned(), entry));
        }
        Some(())
    };
    for line in text.split('\n') {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if comment
                .chars()
                .any(|c| (c < ' ' && c != '\t') || c == '\x7f')
            {
                return None;
            }
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            finish(&mut test)?;
            if header == "defaults]" {
                if defaults.is_some() {
                    return None;
                }
                defaults = Some(Vec::new());
                continue;
            }
            let (id, rest) = basic_string(header.strip_prefix("tests.")?)?;
            if rest != "]" {
                return None;
            }
            test = Some((id, Vec::new()));
            continue;
        }
        // `key = value`, split at the first `=` (a byte search; `key` allows no `=`).
        let equals = line.find('=')?;
        let key = line[..equals].strip_suffix(' ')?;
        let value = line[equals + 1..].strip_prefix(' ')?;
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return None;
        }
        let value = if let Some(rest) = value.strip_prefix('"') {
            // Plain strings only (sizes and percentages); escapes go to the TOML crate.
            let end = rest.find('"')?;
            let (text, tail) = (&rest[..end], &rest[end + 1..]);
            if !tail.is_empty() || text.chars().any(|c| c < ' ' || c == '\\' || c == '\x7f') {
                return None;
            }
            Raw::String(Cow::Borrowed(text))
        } else {
            if value.is_empty()
                || !value.bytes().all(|b| b.is_ascii_digit())
                || (value.len() > 1 && value.starts_with('0'))
            {
                return None;
            }
            Raw::Integer(value.parse().ok()?)
        };
        let table = match (&mut test, &mut defaults) {
            (Some((_, keys)), _) => keys,
            (None, Some(keys)) => keys,
            (None, None) => &mut root,
        };
        if table.iter().any(|(k, _)| k == key) {
            return None;
        }
        table.push((Cow::Borrowed(key), value));
    }
    finish(&mut test)?;
    if root.iter().any(|(k, _)| k != "schema") {
        return None;
    }
    let defaults = defaults.map(Raw::Table);
    let defaults = header(path, root.first().map(|(_, v)| v), defaults.as_ref()).ok()?;
    Some(Baseline {
        defaults,
        tests: sorted_tests(path, entries).ok()?,
    })
}

/// A TOML basic string at the start of `text`: its value and what follows the closing quote.
fn basic_string(text: &str) -> Option<(Cow<'_, str>, &str)> {
    let body = text.strip_prefix('"')?;
    let end = body.find(['"', '\\']).unwrap_or(body.len());
    let plain = |s: &str| !s.chars().any(|c| (c < ' ' && c != '\t') || c == '\x7f');
    if body[end..].starts_with('"') {
        return plain(&body[..end]).then(|| (Cow::Borrowed(&body[..end]), &body[end + 1..]));
    }
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((Cow::Owned(out), &body[i + 1..])),
            '\\' => {
                let (_, escape) = chars.next()?;
                let hex = |chars: &mut std::str::CharIndices, n: usize| {
                    let digits: String = chars.by_ref().take(n).map(|(_, c)| c).collect();
                    (digits.len() == n && digits.bytes().all(|b| b.is_ascii_hexdigit()))
                        .then(|| u32::from_str_radix(&digits, 16).ok())
                        .flatten()
                        .and_then(char::from_u32)
                };
                out.push(match escape {
                    '"' => '"',
                    '\\' => '\\',
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'u' => hex(&mut chars, 4)?,
                    'U' => hex(&mut chars, 8)?,
                    _ => return None,
                });
            }
            c if (c < ' ' && c != '\t') || c == '\x7f' => return None,
            c => out.push(c),
        }
    }
    None
}

/// `at` names the table in messages (`tests."id".`), made only when there is one to give.
fn thresholds(path: &Path, table: &Raw, at: impl Fn() -> String) -> Result<Thresholds> {
    let mut thresholds = Thresholds::default();
    if let Some(value) = table.get("tolerance") {
        let Raw::String(text) = value else {
            return Err(Error::invalid(
                path,
                format!(
                    "key {}tolerance: write a percentage string, e.g. \"10%\"",
                    at()
                ),
            ));
        };
        let fraction = size::parse_percent(text)
            .map_err(|e| Error::invalid(path, format!("key {}tolerance: {e}", at())))?;
        thresholds.tolerance = Some(fraction);
        thresholds.tolerance_text = Some(text.to_string());
    }
    if let Some(value) = table.get("floor") {
        let text = match value {
            Raw::String(text) => text.to_string(),
            Raw::Integer(bytes) => bytes.to_string(),
            _ => {
                return Err(Error::invalid(
                    path,
                    format!("key {}floor: write a size, e.g. \"64 KiB\"", at()),
                ));
            }
        };
        let bytes = size::parse_size(&text)
            .map_err(|e| Error::invalid(path, format!("key {}floor: {e}", at())))?;
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

/// The schema version, checked, and the `[defaults]` thresholds.
fn header(path: &Path, schema: Option<&Raw>, defaults: Option<&Raw>) -> Result<Thresholds> {
    match schema {
        Some(Raw::Integer(SCHEMA)) => {}
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
    match defaults {
        None => Ok(Thresholds::default()),
        Some(defaults @ Raw::Table(_)) => thresholds(path, defaults, || "defaults.".to_owned()),
        Some(_) => Err(Error::invalid(path, "key defaults: must be a table")),
    }
}

/// One test's table: its figures and thresholds.
fn entry(path: &Path, id: &str, test: &Raw) -> Result<Entry> {
    let at = || format!("tests.{}.", quoted(id));
    let Raw::Table(keys) = test else {
        return Err(Error::invalid(
            path,
            format!("key {}: must be a table", quoted(id)),
        ));
    };
    let mut entry = Entry {
        thresholds: thresholds(path, test, at)?,
        ..Entry::default()
    };
    for (key, value) in keys {
        if key == "tolerance" || key == "floor" {
            continue;
        }
        let (name, spread) = match key.strip_suffix("_spread") {
            Some(name) => (name, true),
            None => (&**key, false),
        };
        let Some(index) = FIGURES.iter().position(|(figure, _)| *figure == name) else {
            let known: Vec<_> = FIGURES.iter().map(|f| f.0).collect();
            return Err(Error::invalid(
                path,
                format!(
                    "key {}{key}: unknown; a test has {} (each with a <figure>_spread), \
                     tolerance and floor",
                    at(),
                    known.join(", ")
                ),
            ));
        };
        let bytes = match value {
            Raw::Integer(value) => u64::try_from(*value).ok(),
            _ => None,
        }
        .ok_or_else(|| {
            Error::invalid(
                path,
                format!("key {}{key}: must be a whole number ≥ 0", at()),
            )
        })?;
        if spread {
            entry.spreads[index] = Some(bytes);
            continue;
        }
        entry.figures[index] = Some(bytes);
    }
    Ok(entry)
}

/// The tests as a map, built in bulk: a canonical file is sorted already, so the sort is one
/// pass, where 100,000 inserts would each search the tree.
fn sorted_tests(path: &Path, mut entries: Vec<(String, Entry)>) -> Result<BTreeMap<String, Entry>> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(twice) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::invalid(
            path,
            format!("key tests.{}: defined twice", quoted(&twice[0].0)),
        ));
    }
    Ok(entries.into_iter().collect())
}

impl Entry {
    /// A figure by its key (`peak_bytes`, ...).
    pub fn get(&self, key: &str) -> Option<u64> {
        let index = FIGURES.iter().position(|(name, _)| *name == key)?;
        self.figures[index]
    }
}

impl Baseline {
    pub fn parse(path: &Path, text: &str) -> Result<Baseline> {
        match read_canonical(path, text) {
            Some(baseline) => Ok(baseline),
            None => Self::parse_toml(path, text),
        }
    }

    /// The general reader: any valid TOML.
    fn parse_toml(path: &Path, text: &str) -> Result<Baseline> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Toml {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::from_raw(path, &Raw::from_toml(toml::Value::Table(table)))
    }

    fn from_raw(path: &Path, document: &Raw) -> Result<Baseline> {
        let mut baseline = Baseline {
            defaults: header(path, document.get("schema"), document.get("defaults"))?,
            ..Baseline::default()
        };
        let tests = match document.get("tests") {
            None => return Ok(baseline),
            Some(Raw::Table(tests)) => tests,
            Some(_) => return Err(Error::invalid(path, "key tests: must be a table of tests")),
        };
        let entries = tests
            .iter()
            .map(|(id, test)| Ok((id.to_string(), entry(path, id, test)?)))
            .collect::<Result<Vec<_>>>()?;
        baseline.tests = sorted_tests(path, entries)?;
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
        self.updated_from_runs(std::slice::from_ref(results), prune)
    }

    /// This baseline with the figures of every test that passed in `runs`, reruns of one
    /// suite: each figure is the median of the runs (the lower one of an even count) and, from
    /// two runs on, its spread is what it moved across them. From one run, a test keeps the
    /// spread it had.
    pub fn updated_from_runs(&self, runs: &[Results], prune: bool) -> Baseline {
        let mut next = self.clone();
        if prune {
            next.tests.retain(|id, _| {
                runs.iter().any(|results| {
                    results.tests.contains_key(id) || results.benchmarks.contains_key(id)
                })
            });
        }
        let mut measured: BTreeMap<&String, Vec<[Option<u64>; FIGURES.len()]>> = BTreeMap::new();
        for results in runs {
            for (id, record) in results.entries() {
                if record.outcome != "passed" || record.peak_bytes.is_none() {
                    continue;
                }
                measured.entry(id).or_default().push([
                    record.peak_bytes,
                    record.leaked_bytes,
                    record.rss_peak_bytes,
                    record.allocations,
                ]);
            }
        }
        for (id, observed) in measured {
            let entry = next.tests.entry(id.clone()).or_default();
            for index in 0..FIGURES.len() {
                let mut values: Vec<u64> = observed.iter().filter_map(|v| v[index]).collect();
                values.sort_unstable();
                entry.figures[index] = values.get((values.len().max(1) - 1) / 2).copied();
                if runs.len() > 1 {
                    let spread = values.last().zip(values.first()).map(|(hi, lo)| hi - lo);
                    entry.spreads[index] = spread.filter(|&spread| spread > 0);
                }
            }
        }
        next
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# memgauge baseline: `memgauge baseline update` writes it; review its diffs like code.\n");
        out.push_str("# Sizes are bytes. A test may set its own tolerance = \"20%\" and floor = \"1 MiB\".\n");
        out.push_str("# <figure>_spread: how far it moved across the runs it was learned from.\n");
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
            for (index, (figure, _)) in FIGURES.iter().enumerate() {
                if let Some(value) = entry.figures[index] {
                    let _ = writeln!(out, "{figure} = {value}");
                }
                if let Some(spread) = entry.spreads[index] {
                    let _ = writeln!(out, "{figure}_spread = {spread}");
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
            parsed.tests["b.py::t[\"x\" 'q' \\ $HOME `y` é\n]"].get("allocations"),
            Some(3)
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
        assert_eq!(kept.tests["a.py::t"].get("peak_bytes"), Some(20));
        assert!(kept.tests.contains_key("gone.py::t"));
        assert!(!baseline
            .updated(&results(), true)
            .tests
            .contains_key("gone.py::t"));
        assert!(kept.render().contains("floor = \"1 MiB\""));
    }

    #[test]
    fn several_runs_give_the_median_and_the_spread() {
        let run = |peak: u64, leaked: u64| {
            Results::parse(
                Path::new("r.json"),
                &format!(
                    r#"{{"schema": 1, "tests": {{"a.py::t": {{"outcome": "passed",
                    "peak_bytes": {peak}, "leaked_bytes": {leaked}}}}}}}"#
                ),
            )
            .unwrap()
        };
        let runs = [run(300, 7), run(100, 7), run(200, 7)];
        let baseline = Baseline::default().updated_from_runs(&runs, false);
        let entry = &baseline.tests["a.py::t"];
        assert_eq!(entry.get("peak_bytes"), Some(200));
        assert_eq!(entry.spreads[0], Some(200));
        // A figure that did not move has no spread.
        assert_eq!(
            (entry.get("leaked_bytes"), entry.spreads[1]),
            (Some(7), None)
        );
        let text = baseline.render();
        assert!(text.contains("peak_bytes = 200\npeak_bytes_spread = 200\nleaked_bytes = 7\n"));
        assert_eq!(
            Baseline::parse(Path::new("b.toml"), &text).unwrap(),
            baseline
        );
        // One run later: new figures, the learned spread stays.
        let again = baseline.updated(&run(250, 9), false);
        assert_eq!(again.tests["a.py::t"].get("peak_bytes"), Some(250));
        assert_eq!(again.tests["a.py::t"].spreads[0], Some(200));
        // Two runs: the lower median.
        let two = Baseline::default().updated_from_runs(&runs[..2], false);
        assert_eq!(two.tests["a.py::t"].get("peak_bytes"), Some(100));
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

        /// Whatever `render` writes, the fast reader reads, exactly as the TOML crate does.
        #[test]
        fn the_fast_reader_reads_what_render_writes(
            tests in proptest::collection::btree_map(
                "(\\PC|[\"\\\\\n\r\t\u{1}\u{7f}\u{e9}\u{1F600}]){0,12}",
                (proptest::array::uniform4(proptest::option::of(0..=i64::MAX as u64)),
                 proptest::array::uniform4(proptest::option::of(0..=i64::MAX as u64)),
                 proptest::option::of("[0-9]{1,3}(\\.[0-9])?%"),
                 proptest::option::of("[0-9]{1,4}( (B|KiB|MB))?")),
                0..6,
            ),
            default_tolerance in proptest::option::of("[0-9]{1,2}%"),
        ) {
            let thresholds = |tolerance: Option<String>, floor: Option<String>| Thresholds {
                tolerance: tolerance.as_deref().map(|t| size::parse_percent(t).unwrap()),
                floor: floor.as_deref().map(|f| size::parse_size(f).unwrap()),
                tolerance_text: tolerance,
                floor_text: floor,
            };
            let baseline = Baseline {
                defaults: thresholds(default_tolerance, None),
                tests: tests
                    .into_iter()
                    .map(|(id, (figures, spreads, tolerance, floor))| {
                        (id, Entry { figures, spreads, thresholds: thresholds(tolerance, floor) })
                    })
                    .collect(),
            };
            let text = baseline.render();
            let fast = read_canonical(Path::new("b.toml"), &text);
            proptest::prop_assert_eq!(fast.as_ref(), Some(&baseline), "{}", text);
            proptest::prop_assert_eq!(Baseline::parse_toml(Path::new("b.toml"), &text).unwrap(), baseline);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// On any text it takes, the fast reader agrees with the TOML crate; on the rest it steps
        /// aside. (Texts near the canonical layout: about a third are taken.)
        #[test]
        fn the_fast_reader_agrees_or_steps_aside(text in concat!(
            r#"(# [a-z\t\u{1}]{0,3}\n)?(schema = (1|1|1|1|1|2|"1")\n)?(\[defaults\]\n(tolerance = "[0-9]{1,2}%"\n)?)?"#,
            r#"(\[tests\."([a-z]|[a-z]|[a-z]|[a-z]|"|\\|\\u00[0-9a-f]{2}|\\[nt"\\]){1,4}"\]\n"#,
            r#"((peak_bytes|leaked_bytes|allocations|rss_peak_bytes)(_spread)? = (0|[1-9][0-9]{0,17})\n"#,
            r#"|tolerance = "[0-9]{1,2}%"\n|floor = ("[0-9]{1,3} KiB"|[0-9]{1,5})\n"#,
            r#"|([a-z]{1,2}|peak_bytes)( = |=| =)(-1|01|[0-9]|"x\\y")\n){0,4}\n?){0,3}"#,
        )) {
            if let Some(fast) = read_canonical(Path::new("b.toml"), &text) {
                let general = Baseline::parse_toml(Path::new("b.toml"), &text);
                proptest::prop_assert_eq!(general.ok(), Some(fast), "{}", text);
            }
        }
    }
}
