//! The baseline committed to the repo: TOML, one table per test and environment, sizes as
//! integer bytes, sorted, so unchanged results give a byte-identical file and a change reads as a
//! small diff.
//!
//! Schema 2 keeps each environment's figures apart (`[tests."id"."cp311-linux-x86_64"]`), with a
//! test's own thresholds in `[tests."id"]`, for every environment. Schema 1 (one environment,
//! figures in `[tests."id"]`) is still read: its figures gate results of any environment, and
//! `baseline update` rewrites it as schema 2, its figures becoming those of the environment
//! updated first.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::model::error::{Error, Result};
pub use crate::model::figure::FIGURES;
use crate::model::results::{GateRecord, Results, Site};
use crate::model::size;

pub const SCHEMA: i64 = 2;
/// The layout before environments: read, never written.
const SCHEMA_ONE_ENVIRONMENT: i64 = 1;
/// Where a schema-1 baseline's figures are kept until an update names their environment.
const ANY_ENVIRONMENT: &str = "";
/// How many of a test's top sites the baseline keeps, for the report of a regression: those
/// that held at least 1/[`SITE_SHARE`] of its peak.
pub const SITES_KEPT: usize = 3;
pub const SITE_SHARE: u64 = 20;

/// A test's sites worth keeping and showing: its largest, each holding at least 5% of the peak,
/// with files in an installed package named from the package (`numpy/core/x.py`, not the
/// machine's path to it), so that a baseline reads the same from any machine.
pub fn significant_sites(sites: Vec<Site>, peak: Option<u64>) -> Vec<Site> {
    let peak = peak.unwrap_or(0);
    let mut kept: Vec<Site> = sites
        .into_iter()
        .filter(|site| site.bytes.saturating_mul(SITE_SHARE) >= peak)
        .take(SITES_KEPT)
        .collect();
    for site in &mut kept {
        let portable = portable_file(&site.file);
        if portable.len() != site.file.len() {
            site.file = portable.to_owned();
        }
    }
    kept.shrink_to_fit();
    kept
}

/// `.../site-packages/numpy/x.py` as `numpy/x.py`; any other path as it is.
fn portable_file(file: &str) -> &str {
    [
        "site-packages/",
        "dist-packages/",
        "site-packages\\",
        "dist-packages\\",
    ]
    .iter()
    .filter_map(|marker| file.rfind(marker).map(|at| &file[at + marker.len()..]))
    .min_by_key(|rest| rest.len())
    .unwrap_or(file)
}

/// A tolerance (relative) and a floor (absolute) as written in the file, both optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thresholds {
    pub tolerance: Option<f64>,
    pub floor: Option<u64>,
    tolerance_text: Option<String>,
    floor_text: Option<String>,
}

/// One test's figures in one environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    /// By the index in [`FIGURES`].
    pub figures: [Option<u64>; FIGURES.len()],
    /// How far each figure moved across the runs `baseline update` learned it from (largest
    /// minus smallest), written as `<figure>_spread`; compare allows that much, and says so.
    pub spreads: [Option<u64>; FIGURES.len()],
    /// The lines that held the most at the peak (up to [`SITES_KEPT`]), written as
    /// `"FILE:LINE FUNCTION BYTES"`: what a regression's report sets the new sites beside.
    pub sites: Vec<Site>,
}

/// One test: its thresholds, and its figures in each environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Test {
    pub thresholds: Thresholds,
    pub environments: Environments,
}

/// A test's figures by environment, sorted by key: a few each, in a vector (a map's smallest
/// node holds eleven, which for 100,000 tests of one environment is 200 MB of nothing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Environments(Vec<(String, Entry)>);

impl Environments {
    fn position(&self, key: &str) -> std::result::Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.position(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    pub fn insert(&mut self, key: String, entry: Entry) {
        match self.position(&key) {
            Ok(i) => self.0[i].1 = entry,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (key, entry));
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Entry> {
        self.position(key).ok().map(|i| self.0.remove(i).1)
    }

    /// The entry of `key`, made empty if there is none.
    pub fn entry_or_default(&mut self, key: &str) -> &mut Entry {
        let i = match self.position(key) {
            Ok(i) => i,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (key.to_owned(), Entry::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|(key, _)| keep(key));
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(key, _)| key.as_str())
    }

    pub fn last_key(&self) -> Option<&str> {
        self.0.last().map(|(key, _)| key.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.0.iter().map(|(key, entry)| (key.as_str(), entry))
    }

    /// Appends an environment known to sort after every one held.
    fn push_last(&mut self, key: String, entry: Entry) {
        debug_assert!(self.last_key().map_or(true, |last| last < key.as_str()));
        // Grown one at a time: most tests have one environment, and a vector's first growth
        // makes room for four.
        self.0.reserve_exact(1);
        self.0.push((key, entry));
    }
}

impl FromIterator<(String, Entry)> for Environments {
    fn from_iter<I: IntoIterator<Item = (String, Entry)>>(items: I) -> Self {
        let mut environments = Environments::default();
        for (key, entry) in items {
            environments.insert(key, entry);
        }
        environments
    }
}

impl std::ops::Index<&str> for Environments {
    type Output = Entry;

    fn index(&self, key: &str) -> &Entry {
        self.get(key).expect("the environment is in the baseline")
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Baseline {
    pub defaults: Thresholds,
    pub tests: BTreeMap<String, Test>,
    /// Read from a schema-1 file: one environment's figures, whichever it was.
    pub one_environment: bool,
}

/// A baseline document as either reader sees it: the TOML crate for any file, or the fast reader
/// for the canonical layout `render` writes (100,000 tests read in tens of milliseconds, where a
/// full TOML parse takes about a second and 200 MB). One validation serves both.
#[derive(Debug, Clone, PartialEq)]
enum Raw<'a> {
    Integer(i64),
    String(Cow<'a, str>),
    Strings(Vec<Cow<'a, str>>),
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
            toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => Raw::Strings(
                items
                    .into_iter()
                    .filter_map(|v| match v {
                        toml::Value::String(text) => Some(Cow::Owned(text)),
                        _ => None,
                    })
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
            Raw::Strings(_) => f.write_str("an array"),
            Raw::Table(_) => f.write_str("a table"),
            Raw::Other(text) => f.write_str(text),
        }
    }
}

type Keys<'a> = Vec<(Cow<'a, str>, Raw<'a>)>;

/// The table the fast reader is in.
enum Table<'a> {
    Root,
    Defaults,
    /// `[tests."id"]`: schema 1, the figures and thresholds; schema 2, the thresholds.
    Test(Cow<'a, str>),
    /// `[tests."id"."environment"]` (schema 2).
    Environment(Cow<'a, str>, Cow<'a, str>),
    /// An environment that was not asked for: its lines are passed over unread.
    Skipped,
}

/// The canonical layout, line by line: comments, `schema = N`, `[defaults]`, `[tests."id"]`,
/// `[tests."id"."environment"]`, and `key = 123`, `key = "text"` or `key = ["text", ...]`. Each
/// table is checked and kept as soon as it ends, so nothing of the file is held but the baseline
/// itself; with `only`, the tables of other environments are skipped unread. Anything else (other
/// spacing, inline tables, dotted keys, a repeated key, tables out of order, CRLF) and any invalid
/// value answer `None`, and the TOML crate reads the file instead (and words the error).
fn read_canonical(path: &Path, text: &str, only: Option<&BTreeSet<&str>>) -> Option<Baseline> {
    let mut root: Keys = Vec::new();
    let mut defaults: Option<Keys> = None;
    let mut schema: Option<i64> = None;
    let mut table = Table::Root;
    let mut keys: Keys = Vec::new();
    let mut tests: Vec<(String, Test)> = Vec::new();
    // Files the table that ends into the tests, which must come sorted: a test's own table
    // first, then its environments in order.
    let mut finish = |table: Table, keys: Keys, schema: i64| -> Option<()> {
        match table {
            Table::Root | Table::Defaults | Table::Skipped => {}
            Table::Test(id) => {
                let test = test_table(path, schema, &id, &Raw::Table(keys)).ok()?;
                if tests.last().is_some_and(|(last, _)| last.as_str() >= &*id) {
                    return None;
                }
                tests.push((id.into_owned(), test));
            }
            Table::Environment(id, environment) => {
                let entry = environment_table(path, &id, &environment, &Raw::Table(keys)).ok()?;
                match tests.last_mut() {
                    Some((last, test)) if *last == *id => {
                        if test
                            .environments
                            .last_key()
                            .is_some_and(|last| last >= &*environment)
                        {
                            return None;
                        }
                        test.environments.push_last(environment.into_owned(), entry);
                    }
                    Some((last, _)) if last.as_str() > &*id => return None,
                    _ => {
                        let mut test = Test::default();
                        test.environments.push_last(environment.into_owned(), entry);
                        tests.push((id.into_owned(), test));
                    }
                }
            }
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
            if matches!(table, Table::Root) {
                schema = Some(schema_of(&root)?);
            }
            let current = schema?;
            finish(
                std::mem::replace(&mut table, Table::Skipped),
                std::mem::take(&mut keys),
                current,
            )?;
            if header == "defaults]" {
                if defaults.is_some() {
                    return None;
                }
                defaults = Some(Vec::new());
                table = Table::Defaults;
                continue;
            }
            let (id, rest) = basic_string(header.strip_prefix("tests.")?)?;
            if rest == "]" {
                table = Table::Test(id);
                continue;
            }
            if current != SCHEMA {
                return None;
            }
            let (environment, rest) = basic_string(rest.strip_prefix('.')?)?;
            if rest != "]" {
                return None;
            }
            table = match only {
                Some(only) if !only.contains(&*environment) => Table::Skipped,
                _ => Table::Environment(id, environment),
            };
            continue;
        }
        if matches!(table, Table::Skipped) {
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
        let value = if let Some(mut rest) = value.strip_prefix('[') {
            let mut items = Vec::new();
            while rest != "]" {
                let (item, tail) = basic_string(rest)?;
                items.push(item);
                rest = match tail.strip_prefix(", ") {
                    Some(more) => more,
                    None if tail == "]" => tail,
                    None => return None,
                };
            }
            Raw::Strings(items)
        } else if let Some(rest) = value.strip_prefix('"') {
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
        let keys = match table {
            Table::Root => &mut root,
            Table::Defaults => defaults.as_mut()?,
            _ => &mut keys,
        };
        if keys.iter().any(|(k, _)| k == key) {
            return None;
        }
        keys.push((Cow::Borrowed(key), value));
    }
    let schema = match schema {
        Some(schema) => schema,
        // No tables at all.
        None => schema_of(&root)?,
    };
    finish(table, keys, schema)?;
    let defaults = defaults.map(Raw::Table);
    let defaults = header(path, root.first().map(|(_, v)| v), defaults.as_ref()).ok()?;
    Some(Baseline {
        defaults,
        tests: tests.into_iter().collect(),
        one_environment: schema == SCHEMA_ONE_ENVIRONMENT,
    })
}

/// The schema a canonical file's root declares, when it declares nothing else.
fn schema_of(root: &Keys) -> Option<i64> {
    match root.as_slice() {
        [(key, Raw::Integer(n @ (SCHEMA | SCHEMA_ONE_ENVIRONMENT)))] if key == "schema" => Some(*n),
        _ => None,
    }
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
    push_quoted(&mut out, text);
    out
}

/// [`quoted`], onto the end of `out`.
fn push_quoted(out: &mut String, text: &str) {
    if !text
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        out.push('"');
        out.push_str(text);
        out.push('"');
        return;
    }
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
}

/// The schema version, checked, and the `[defaults]` thresholds.
fn header(path: &Path, schema: Option<&Raw>, defaults: Option<&Raw>) -> Result<Thresholds> {
    match schema {
        Some(Raw::Integer(SCHEMA | SCHEMA_ONE_ENVIRONMENT)) => {}
        Some(other) => {
            return Err(Error::invalid(
                path,
                format!("key schema: version {other} is not one this memgauge reads ({SCHEMA_ONE_ENVIRONMENT} or {SCHEMA}); upgrade memgauge"),
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

/// A test's table, `[tests."id"]`. Schema 2: its thresholds, and its environments' tables when
/// the TOML crate read it. Schema 1: its thresholds and figures, in one environment.
fn test_table(path: &Path, schema: i64, id: &str, test: &Raw) -> Result<Test> {
    let at = || format!("tests.{}.", quoted(id));
    let Raw::Table(keys) = test else {
        return Err(Error::invalid(
            path,
            format!("key tests.{}: must be a table", quoted(id)),
        ));
    };
    let mut result = Test {
        thresholds: thresholds(path, test, at)?,
        ..Test::default()
    };
    if schema == SCHEMA_ONE_ENVIRONMENT {
        let entry = figures(
            path,
            at,
            keys.iter()
                .filter(|(k, _)| k != "tolerance" && k != "floor"),
        )?;
        result
            .environments
            .insert(ANY_ENVIRONMENT.to_owned(), entry);
        return Ok(result);
    }
    for (key, value) in keys {
        match value {
            _ if key == "tolerance" || key == "floor" => {}
            Raw::Table(_) => {
                let entry = environment_table(path, id, key, value)?;
                result.environments.insert(key.to_string(), entry);
            }
            _ => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "key {}{key}: a test's table holds its tolerance and floor, and its \
                         figures go in the table of their environment, [tests.{}.\"ENVIRONMENT\"]",
                        at(),
                        quoted(id)
                    ),
                ));
            }
        }
    }
    Ok(result)
}

/// One test's figures in one environment, `[tests."id"."environment"]`.
fn environment_table(path: &Path, id: &str, environment: &str, table: &Raw) -> Result<Entry> {
    let at = || format!("tests.{}.{}.", quoted(id), quoted(environment));
    let Raw::Table(keys) = table else {
        return Err(Error::invalid(
            path,
            format!("key {}: must be a table", at()),
        ));
    };
    if let Some((key, _)) = keys.iter().find(|(k, _)| k == "tolerance" || k == "floor") {
        return Err(Error::invalid(
            path,
            format!(
                "key {}{key}: thresholds hold for every environment: set it in [tests.{}]",
                at(),
                quoted(id)
            ),
        ));
    }
    figures(path, at, keys.iter())
}

/// The figures, spreads and sites of a table.
fn figures<'k, 'a: 'k>(
    path: &Path,
    at: impl Fn() -> String,
    keys: impl Iterator<Item = &'k (Cow<'a, str>, Raw<'a>)>,
) -> Result<Entry> {
    let mut entry = Entry::default();
    for (key, value) in keys {
        if key == "sites" {
            let invalid = || {
                Error::invalid(
                    path,
                    format!(
                        "key {}sites: must be an array of \"FILE:LINE FUNCTION BYTES\"",
                        at()
                    ),
                )
            };
            let Raw::Strings(items) = value else {
                return Err(invalid());
            };
            let mut sites = Vec::with_capacity(items.len());
            for item in items {
                sites.push(parse_site(item).ok_or_else(invalid)?);
            }
            entry.sites = sites;
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
                    "key {}{key}: unknown; an environment's table has {} (each with a \
                     <figure>_spread) and sites",
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
        } else {
            entry.figures[index] = Some(bytes);
        }
    }
    Ok(entry)
}

/// `"FILE:LINE FUNCTION BYTES"`: the file may hold spaces and colons, the function holds neither.
fn parse_site(text: &str) -> Option<Site> {
    let (rest, bytes) = text.rsplit_once(' ')?;
    let (location, function) = rest.rsplit_once(' ')?;
    let (file, line) = location.rsplit_once(':')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(line) || !digits(bytes) || function.is_empty() || file.is_empty() {
        return None;
    }
    Some(Site {
        file: file.to_owned(),
        line: line.parse().ok()?,
        function: function.to_owned(),
        bytes: bytes.parse().ok()?,
    })
}

/// A site as the baseline writes it, quoted: `"FILE:LINE FUNCTION BYTES"`.
fn push_site(out: &mut String, site: &Site) {
    let plain = |s: &str| !s.chars().any(|c| c == '"' || c == '\\' || c.is_control());
    let spaced = site.function.chars().any(char::is_whitespace);
    if !plain(&site.file) || !plain(&site.function) || spaced {
        push_quoted(out, &format_site(site));
        return;
    }
    out.push('"');
    out.push_str(&site.file);
    out.push(':');
    size::push_number(out, site.line.into());
    out.push(' ');
    out.push_str(&site.function);
    out.push(' ');
    size::push_number(out, site.bytes);
    out.push('"');
}

fn format_site(site: &Site) -> String {
    // A function name with a space would not read back: such a name is not Python's.
    let function: String = site
        .function
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    format!("{}:{} {function} {}", site.file, site.line, site.bytes)
}

impl Entry {
    /// A figure by its key (`peak_bytes`, ...).
    pub fn get(&self, key: &str) -> Option<u64> {
        let index = FIGURES.iter().position(|(name, _)| *name == key)?;
        self.figures[index]
    }
}

/// What one environment's runs say of a test: its figures, their spread when two or more runs
/// have it, and its sites.
struct Learned {
    figures: [Option<u64>; FIGURES.len()],
    spreads: Option<[Option<u64>; FIGURES.len()]>,
    sites: Vec<Site>,
}

/// The figures of every test that passed in `runs` (shards or reruns of one environment): each
/// the median of the runs that have the test (the lower one of an even count), with the spread
/// across them from two runs on, and the sites of the run whose peak is the one kept.
fn learned<'r>(runs: &[&'r Results<GateRecord>]) -> Vec<(&'r String, Learned)> {
    type Observed<'r> = ([Option<u64>; FIGURES.len()], &'r GateRecord);
    let figures = |record: &GateRecord| {
        [
            record.peak_bytes,
            record.leaked_bytes,
            record.rss_peak_bytes,
            record.allocations,
        ]
    };
    let measured = |record: &&GateRecord| record.passed && record.peak_bytes.is_some();
    let mut observed: Vec<(&String, Vec<Observed>)> = match runs {
        // One run (the common case): its tests, in order, without a map.
        [results] => results
            .entries()
            .filter(|(_, record)| measured(record))
            .map(|(id, record)| (id, vec![(figures(record), record)]))
            .collect(),
        _ => {
            let mut by_test: BTreeMap<&String, Vec<Observed>> = BTreeMap::new();
            for results in runs {
                for (id, record) in results.entries().filter(|(_, r)| measured(r)) {
                    by_test
                        .entry(id)
                        .or_default()
                        .push((figures(record), record));
                }
            }
            by_test.into_iter().collect()
        }
    };
    // Tests and benchmarks are each sorted; together, not always.
    if !observed.windows(2).all(|w| w[0].0 < w[1].0) {
        observed.sort_by(|a, b| a.0.cmp(b.0));
    }
    observed
        .into_iter()
        .map(|(id, observed)| {
            let (figures, spreads) = match observed.as_slice() {
                [(figures, _)] => (*figures, None),
                _ => {
                    let mut figures = [None; FIGURES.len()];
                    let mut spreads = [None; FIGURES.len()];
                    for index in 0..FIGURES.len() {
                        let mut values: Vec<u64> =
                            observed.iter().filter_map(|v| v.0[index]).collect();
                        values.sort_unstable();
                        figures[index] = values.get((values.len().max(1) - 1) / 2).copied();
                        let spread = values.last().zip(values.first()).map(|(hi, lo)| hi - lo);
                        spreads[index] = spread.filter(|&spread| spread > 0);
                    }
                    (figures, Some(spreads))
                }
            };
            let sites = observed
                .iter()
                .find(|(observed, _)| observed[0] == figures[0])
                .map_or_else(Vec::new, |(_, record)| record.sites());
            let sites = significant_sites(sites, figures[0]);
            (
                id,
                Learned {
                    figures,
                    spreads,
                    sites,
                },
            )
        })
        .collect()
}

impl Baseline {
    pub fn parse(path: &Path, text: &str) -> Result<Baseline> {
        Self::parse_environments(path, text, None)
    }

    /// The baseline with only the figures of `only`'s environments (a schema-1 file's, which
    /// serve any, are kept). The other environments' tables are skipped unread by the fast
    /// reader: `baseline update` checks them, compare does not need to.
    pub fn parse_environments(
        path: &Path,
        text: &str,
        only: Option<&BTreeSet<&str>>,
    ) -> Result<Baseline> {
        if let Some(baseline) = read_canonical(path, text, only) {
            return Ok(baseline);
        }
        let mut baseline = Self::parse_toml(path, text)?;
        if let (Some(only), false) = (only, baseline.one_environment) {
            for test in baseline.tests.values_mut() {
                test.environments.retain(|key| only.contains(key));
            }
        }
        Ok(baseline)
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
        let schema = document.get("schema");
        let mut baseline = Baseline {
            defaults: header(path, schema, document.get("defaults"))?,
            one_environment: schema == Some(&Raw::Integer(SCHEMA_ONE_ENVIRONMENT)),
            ..Baseline::default()
        };
        let schema = if baseline.one_environment {
            SCHEMA_ONE_ENVIRONMENT
        } else {
            SCHEMA
        };
        if let Raw::Table(keys) = document {
            if let Some((key, _)) = keys
                .iter()
                .find(|(k, _)| !matches!(&**k, "schema" | "defaults" | "tests"))
            {
                return Err(Error::invalid(
                    path,
                    format!("key {key}: unknown; a baseline has schema, defaults and tests"),
                ));
            }
        }
        let tests = match document.get("tests") {
            None => return Ok(baseline),
            Some(Raw::Table(tests)) => tests,
            Some(_) => return Err(Error::invalid(path, "key tests: must be a table of tests")),
        };
        // The TOML crate has checked that no test is defined twice.
        baseline.tests = tests
            .iter()
            .map(|(id, test)| Ok((id.to_string(), test_table(path, schema, id, test)?)))
            .collect::<Result<_>>()?;
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

    /// The environments with figures in this baseline.
    pub fn environments(&self) -> BTreeSet<&str> {
        let mut seen = BTreeSet::new();
        for test in self.tests.values() {
            for key in test.environments.keys() {
                if !seen.contains(key) {
                    seen.insert(key);
                }
            }
        }
        seen
    }

    /// Where results of `environment` find their figures: its own, or a schema-1 file's, which
    /// serve any environment; `None` when the baseline has never seen it.
    pub fn figures_for<'s>(&'s self, environment: &'s str) -> Option<&'s str> {
        if self.one_environment {
            return Some(ANY_ENVIRONMENT);
        }
        self.tests
            .values()
            .any(|test| test.environments.contains_key(environment))
            .then_some(environment)
    }

    /// This baseline with the figures of every passed test in `results`, measured in
    /// `environment`.
    pub fn updated(
        &self,
        environment: &str,
        results: &Results<GateRecord>,
        prune: bool,
    ) -> Baseline {
        self.updated_from_runs(&[(environment, results)], prune)
    }

    /// This baseline with the figures of every test that passed in `runs`, each in its
    /// environment; the other environments are left as they are (with `prune`, dropped, as are
    /// the tests that no run of their environment has). Within an environment, runs are shards
    /// or reruns of a suite: each figure is the median of the runs that have the test (the lower
    /// one of an even count) and, when two or more have it, its spread is what it moved across
    /// them; a test that one run has keeps the spread it had. A schema-1 baseline's figures
    /// become those of the first run's environment.
    pub fn updated_from_runs(
        &self,
        runs: &[(&str, &Results<GateRecord>)],
        prune: bool,
    ) -> Baseline {
        self.clone().into_updated(runs, prune)
    }

    /// [`Baseline::updated_from_runs`], without a copy of this baseline.
    pub fn into_updated(self, runs: &[(&str, &Results<GateRecord>)], prune: bool) -> Baseline {
        let mut next = self;
        if next.one_environment {
            next.one_environment = false;
            if let Some((first, _)) = runs.first() {
                for test in next.tests.values_mut() {
                    if let Some(entry) = test.environments.remove(ANY_ENVIRONMENT) {
                        test.environments.insert((*first).to_owned(), entry);
                    }
                }
            }
        }
        let mut by_environment: BTreeMap<&str, Vec<&Results<GateRecord>>> = BTreeMap::new();
        for (environment, results) in runs {
            by_environment.entry(environment).or_default().push(results);
        }
        if prune {
            next.tests.retain(|id, test| {
                test.environments.retain(|environment| {
                    by_environment.get(environment).is_some_and(|runs| {
                        runs.iter().any(|results| {
                            results.tests.contains_key(id) || results.benchmarks.contains_key(id)
                        })
                    })
                });
                !test.environments.is_empty()
            });
        }
        // Each environment's new entries are worked out apart, on two threads when there are
        // several (a matrix's update is mostly reading sites), then filed in.
        let work: Vec<(&str, Vec<&Results<GateRecord>>)> = by_environment.into_iter().collect();
        type Work<'w, 'r> = [(&'w str, Vec<&'r Results<GateRecord>>)];
        fn learn<'w, 'r>(work: &Work<'w, 'r>) -> Vec<(&'w str, Vec<(&'r String, Learned)>)> {
            work.iter()
                .map(|(environment, runs)| (*environment, learned(runs)))
                .collect()
        }
        let learned = if work.len() > 1 {
            let (first, second) = work.split_at(work.len() / 2);
            std::thread::scope(|scope| {
                let later = scope.spawn(|| learn(second));
                let mut all = learn(first);
                all.extend(later.join().expect("learning figures does not panic"));
                all
            })
        } else {
            learn(&work)
        };
        let apply = |test: &mut Test, environment: &str, update: Learned| {
            let entry = test.environments.entry_or_default(environment);
            entry.figures = update.figures;
            if let Some(spreads) = update.spreads {
                entry.spreads = spreads;
            }
            entry.sites = update.sites;
        };
        // One list by test (each test's environments together, while its table is in cache),
        // sorted by id like the tests: one walk files them in, without a lookup each.
        let mut updates: Vec<(&String, &str, Learned)> = learned
            .into_iter()
            .flat_map(|(environment, entries)| {
                entries
                    .into_iter()
                    .map(move |(id, update)| (id, environment, update))
            })
            .collect();
        updates.sort_by(|a, b| a.0.cmp(b.0));
        let mut tests = next.tests.iter_mut().peekable();
        let mut added = Vec::new();
        for (id, environment, update) in updates {
            while tests.next_if(|(known, _)| *known < id).is_some() {}
            match tests.peek_mut() {
                Some((known, test)) if *known == id => apply(test, environment, update),
                _ => added.push((id, environment, update)),
            }
        }
        for (id, environment, update) in added {
            apply(
                next.tests.entry(id.clone()).or_default(),
                environment,
                update,
            );
        }
        next
    }

    pub fn render(&self) -> String {
        // About 200 bytes a table: grown once, not forty times.
        let tables: usize = self
            .tests
            .values()
            .map(|t| t.environments.0.len() + 1)
            .sum();
        let mut out = String::with_capacity(tables * 200);
        out.push_str("# memgauge baseline: `memgauge baseline update` writes it; review its diffs like code.\n");
        out.push_str("# Sizes are bytes; figures are kept per environment, [tests.\"ID\".\"ENVIRONMENT\"].\n");
        out.push_str("# A test may set its own tolerance = \"20%\" and floor = \"1 MiB\" in [tests.\"ID\"].\n");
        out.push_str("# <figure>_spread: how far it moved across the runs it was learned from.\n");
        let schema = if self.one_environment {
            SCHEMA_ONE_ENVIRONMENT
        } else {
            SCHEMA
        };
        let _ = writeln!(out, "schema = {schema}");
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
        let environments: BTreeMap<&str, String> = self
            .environments()
            .into_iter()
            .map(|key| (key, quoted(key)))
            .collect();
        let mut id = String::new();
        for (test_id, test) in &self.tests {
            id.clear();
            push_quoted(&mut id, test_id);
            if test.thresholds != Thresholds::default() || self.one_environment {
                let _ = write!(out, "\n[tests.{id}]\n");
                write_thresholds(&mut out, &test.thresholds);
            }
            for (environment, entry) in test.environments.iter() {
                if !self.one_environment {
                    out.push_str("\n[tests.");
                    out.push_str(&id);
                    out.push('.');
                    out.push_str(&environments[environment]);
                    out.push_str("]\n");
                }
                for (index, (figure, _)) in FIGURES.iter().enumerate() {
                    for (value, suffix) in [
                        (entry.figures[index], " = "),
                        (entry.spreads[index], "_spread = "),
                    ] {
                        if let Some(value) = value {
                            out.push_str(figure);
                            out.push_str(suffix);
                            size::push_number(&mut out, value);
                            out.push('\n');
                        }
                    }
                }
                if !entry.sites.is_empty() {
                    out.push_str("sites = [");
                    for (i, site) in entry.sites.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        push_site(&mut out, site);
                    }
                    out.push_str("]\n");
                }
            }
        }
        out
    }
}

/// How many changed tables `diff` shows before it only counts them.
const DIFF_TABLES_SHOWN: usize = 500;

/// The changes between two baseline texts, for review, table by table: each changed table after
/// an `@@` line, its lines marked `-` and `+` as in a unified diff. (A matrix's baseline is a
/// million lines; a line diff of all of them took longer than the update, where comparing
/// tables is one hash each.) Past [`DIFF_TABLES_SHOWN`] tables, the rest are counted.
pub fn diff(path: &Path, old: &str, new: &str) -> String {
    fn tables(text: &str) -> Vec<&str> {
        text.split("\n\n")
            .filter(|t| !t.trim().is_empty())
            .collect()
    }
    fn header(table: &str) -> &str {
        table.trim_start_matches('\n').lines().next().unwrap_or("")
    }
    let (old_tables, new_tables) = (tables(old), tables(new));
    // Both in the baseline's order: walked side by side, a table that is not where the other
    // text has it is looked for a little further on (a test added or dropped), else counted as
    // removed and added.
    const LOOK_AHEAD: usize = 64;
    let mut changes: Vec<(&str, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < old_tables.len() || j < new_tables.len() {
        match (old_tables.get(i), new_tables.get(j)) {
            (Some(before), Some(after)) if before == after => {
                i += 1;
                j += 1;
            }
            (Some(before), Some(after)) if header(before) == header(after) => {
                changes.push((before, after));
                i += 1;
                j += 1;
            }
            (Some(before), Some(after)) => {
                let later = |tables: &[&str], from: usize, head: &str| {
                    tables[from..tables.len().min(from + LOOK_AHEAD)]
                        .iter()
                        .position(|t| header(t) == head)
                };
                if let Some(skip) = later(&new_tables, j + 1, header(before)) {
                    for added in &new_tables[j..j + 1 + skip] {
                        changes.push(("", added));
                    }
                    j += 1 + skip;
                } else if let Some(skip) = later(&old_tables, i + 1, header(after)) {
                    for removed in &old_tables[i..i + 1 + skip] {
                        changes.push((removed, ""));
                    }
                    i += 1 + skip;
                } else {
                    changes.push((before, ""));
                    changes.push(("", after));
                    i += 1;
                    j += 1;
                }
            }
            (Some(before), None) => {
                changes.push((before, ""));
                i += 1;
            }
            (None, Some(after)) => {
                changes.push(("", after));
                j += 1;
            }
            (None, None) => break,
        }
    }
    let name = path.display();
    let mut out = format!("--- a/{name}\n+++ b/{name}\n");
    for (before, after) in changes.iter().take(DIFF_TABLES_SHOWN) {
        out.push_str("@@\n");
        let (before, after) = (
            format!("{}\n", before.trim_matches('\n')),
            format!("{}\n", after.trim_matches('\n')),
        );
        for change in
            similar::TextDiff::from_lines(before.as_str(), after.as_str()).iter_all_changes()
        {
            let sign = match change.tag() {
                similar::ChangeTag::Delete => '-',
                similar::ChangeTag::Insert => '+',
                similar::ChangeTag::Equal => ' ',
            };
            let line = change.value();
            if line.trim().is_empty() {
                continue;
            }
            out.push(sign);
            out.push_str(line);
        }
    }
    if changes.len() > DIFF_TABLES_SHOWN {
        let _ = writeln!(
            out,
            "... and {} more tables changed (`git diff {name}` shows them all)",
            changes.len() - DIFF_TABLES_SHOWN
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "cp311-linux-x86_64";

    fn results() -> Results<GateRecord> {
        Results::<GateRecord>::parse(
            Path::new("r.json"),
            r#"{"schema": 1, "tests": {
            "b.py::t[\"x\" 'q' \\ $HOME `y` é\n]": {"outcome": "passed", "peak_bytes": 10, "leaked_bytes": 1, "allocations": 3},
            "a.py::t": {"outcome": "passed", "peak_bytes": 20, "leaked_bytes": 0, "rss_peak_bytes": 4096,
              "top_sites": [{"file": "a b:c.py", "line": 3, "function": "f", "bytes": 18},
                            {"file": "a.py", "line": 4, "function": "<lambda>", "bytes": 1},
                            {"file": "a.py", "line": 5, "function": "g", "bytes": 1},
                            {"file": "a.py", "line": 6, "function": "h", "bytes": 0}]},
            "a.py::failed": {"outcome": "failed", "peak_bytes": 99}}}"#,
        )
        .unwrap()
    }

    fn figures(baseline: &Baseline, id: &str, environment: &str) -> Entry {
        baseline.tests[id].environments[environment].clone()
    }

    #[test]
    fn renders_sorted_and_round_trips_any_test_id() {
        let baseline = Baseline::default().updated(ENV, &results(), false);
        let text = baseline.render();
        assert!(
            text.find("a.py::t").unwrap() < text.find("b.py::t").unwrap(),
            "{text}"
        );
        assert!(!text.contains("a.py::failed"));
        assert!(text.contains("schema = 2\n"));
        assert!(text.contains(&format!("[tests.\"a.py::t\".\"{ENV}\"]\n")));
        let parsed = Baseline::parse(Path::new("b.toml"), &text).unwrap();
        assert_eq!(parsed, baseline);
        assert_eq!(
            Baseline::parse_toml(Path::new("b.toml"), &text).unwrap(),
            baseline
        );
        assert_eq!(parsed.render(), text);
        let b = "b.py::t[\"x\" 'q' \\ $HOME `y` é\n]";
        assert_eq!(figures(&parsed, b, ENV).get("allocations"), Some(3));
        // The sites: at most three, a file with a space and a colon read back.
        let sites = &figures(&parsed, "a.py::t", ENV).sites;
        assert_eq!(sites.len(), SITES_KEPT);
        assert_eq!(
            (sites[0].file.as_str(), sites[0].line, sites[0].bytes),
            ("a b:c.py", 3, 18)
        );
        assert!(
            text.contains("sites = [\"a b:c.py:3 f 18\", \"a.py:4 <lambda> 1\", \"a.py:5 g 1\"]\n")
        );
    }

    #[test]
    fn the_diff_shows_changed_added_and_removed_tables_only() {
        let table = |id: &str, peak: u64| format!("[tests.\"{id}\".\"e\"]\npeak_bytes = {peak}\n");
        let head = "# memgauge\nschema = 2\n";
        let old = format!(
            "{head}\n{}\n{}\n{}",
            table("a", 1),
            table("b", 2),
            table("c", 3)
        );
        let new = format!(
            "{head}\n{}\n{}\n{}",
            table("a", 1),
            table("c", 4),
            table("d", 5)
        );
        let diff = diff(Path::new("b.toml"), &old, &new);
        assert_eq!(
            diff,
            "--- a/b.toml\n+++ b/b.toml\n\
             @@\n-[tests.\"b\".\"e\"]\n-peak_bytes = 2\n\
             @@\n [tests.\"c\".\"e\"]\n-peak_bytes = 3\n+peak_bytes = 4\n\
             @@\n+[tests.\"d\".\"e\"]\n+peak_bytes = 5\n"
        );
    }

    #[test]
    fn sites_are_the_significant_ones_named_portably() {
        let site = |file: &str, bytes: u64| Site {
            file: file.to_owned(),
            line: 1,
            function: "f".to_owned(),
            bytes,
        };
        let sites = [
            site(
                "/home/ci/.venv/lib/python3.12/site-packages/numpy/_core/x.py",
                900,
            ),
            site("C:\\py\\Lib\\site-packages\\pkg\\y.py", 100),
            site("tests/t.py", 49),
        ];
        let kept = significant_sites(sites.to_vec(), Some(1000));
        let files: Vec<&str> = kept.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(files, ["numpy/_core/x.py", "pkg\\y.py"]);
    }

    #[test]
    fn each_environment_is_updated_apart_and_the_others_stay_byte_identical() {
        let run = |peak: u64| {
            Results::<GateRecord>::parse(
                Path::new("r.json"),
                &format!(r#"{{"schema": 1, "tests": {{"a.py::t": {{"outcome": "passed", "peak_bytes": {peak}}}}}}}"#),
            )
            .unwrap()
        };
        let (first, second) = (run(100), run(200));
        let both = Baseline::default().updated_from_runs(
            &[
                ("cp311-linux-x86_64", &first),
                ("cp312-linux-x86_64", &second),
            ],
            false,
        );
        assert_eq!(
            figures(&both, "a.py::t", "cp311-linux-x86_64").get("peak_bytes"),
            Some(100)
        );
        assert_eq!(
            figures(&both, "a.py::t", "cp312-linux-x86_64").get("peak_bytes"),
            Some(200)
        );
        let text = both.render();
        let cp312 = text.find("[tests.\"a.py::t\".\"cp312").unwrap();
        // A new 3.11 run changes nothing in 3.12's table.
        let again = Baseline::parse(Path::new("b.toml"), &text)
            .unwrap()
            .updated("cp311-linux-x86_64", &run(150), false)
            .render();
        assert_eq!(
            again[again.find("[tests.\"a.py::t\".\"cp312").unwrap()..],
            text[cp312..]
        );
        assert!(again.contains("peak_bytes = 150\n"));
        // Asked for one environment, the reader keeps only its figures.
        let only: BTreeSet<&str> = ["cp312-linux-x86_64"].into();
        let one = Baseline::parse_environments(Path::new("b.toml"), &text, Some(&only)).unwrap();
        assert_eq!(one.environments(), only);
        assert_eq!(one.figures_for("cp311-linux-x86_64"), None);
        assert_eq!(
            one.figures_for("cp312-linux-x86_64"),
            Some("cp312-linux-x86_64")
        );
        // --prune drops the environments no results are of.
        let pruned = both.updated("cp312-linux-x86_64", &second, true);
        assert_eq!(pruned.environments(), only);
    }

    #[test]
    fn a_schema_1_baseline_serves_any_environment_until_an_update_names_it() {
        let text = "schema = 1\n[defaults]\ntolerance = \"5%\"\n\
            [tests.\"a.py::t\"]\npeak_bytes = 1\nfloor = \"1 MiB\"\n[tests.\"gone.py::t\"]\npeak_bytes = 5\n";
        for reader in [Baseline::parse, Baseline::parse_toml] {
            let baseline = reader(Path::new("b.toml"), text).unwrap();
            assert!(baseline.one_environment);
            assert_eq!(
                baseline.figures_for("cp39-darwin-arm64"),
                Some(ANY_ENVIRONMENT)
            );
            assert_eq!(baseline.defaults.tolerance, Some(0.05));
            let migrated = baseline.updated(ENV, &results(), false);
            assert!(!migrated.one_environment);
            let test = &migrated.tests["a.py::t"];
            assert_eq!(test.thresholds.floor, Some(1 << 20));
            assert_eq!(test.environments[ENV].get("peak_bytes"), Some(20));
            assert_eq!(
                figures(&migrated, "gone.py::t", ENV).get("peak_bytes"),
                Some(5)
            );
            let rendered = migrated.render();
            assert!(
                rendered.contains("[tests.\"a.py::t\"]\nfloor = \"1 MiB\"\n"),
                "{rendered}"
            );
            assert!(!baseline
                .updated(ENV, &results(), true)
                .tests
                .contains_key("gone.py::t"));
        }
    }

    #[test]
    fn several_runs_give_the_median_and_the_spread() {
        let run = |peak: u64, leaked: u64| {
            Results::<GateRecord>::parse(
                Path::new("r.json"),
                &format!(
                    r#"{{"schema": 1, "tests": {{"a.py::t": {{"outcome": "passed",
                    "peak_bytes": {peak}, "leaked_bytes": {leaked}}}}}}}"#
                ),
            )
            .unwrap()
        };
        let runs = [run(300, 7), run(100, 7), run(200, 7)];
        let of_env: Vec<(&str, &Results<GateRecord>)> = runs.iter().map(|r| (ENV, r)).collect();
        let baseline = Baseline::default().updated_from_runs(&of_env, false);
        let entry = figures(&baseline, "a.py::t", ENV);
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
        let again = baseline.updated(ENV, &run(250, 9), false);
        assert_eq!(figures(&again, "a.py::t", ENV).get("peak_bytes"), Some(250));
        assert_eq!(figures(&again, "a.py::t", ENV).spreads[0], Some(200));
        // Two runs: the lower median.
        let two = Baseline::default().updated_from_runs(&of_env[..2], false);
        assert_eq!(figures(&two, "a.py::t", ENV).get("peak_bytes"), Some(100));
        // Shards: a test in one of them keeps its spread.
        let other = Results::<GateRecord>::parse(
            Path::new("r.json"),
            r#"{"schema": 1, "tests": {"b.py::t": {"outcome": "passed", "peak_bytes": 1}}}"#,
        )
        .unwrap();
        let sharded = baseline.updated_from_runs(&[(ENV, &runs[0]), (ENV, &other)], false);
        assert_eq!(figures(&sharded, "a.py::t", ENV).spreads[0], Some(200));
        assert_eq!(figures(&sharded, "b.py::t", ENV).get("peak_bytes"), Some(1));
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
        assert!(error("schema = 3\n").contains("key schema: version 3"));
        assert!(error("schema = [\n").starts_with("b.toml: invalid TOML"));
        assert!(error("[tests]\n").contains("no schema key"));
        assert!(error("schema = 2\n[tests.\"a\"]\npeak_bytes = 3\n")
            .contains("[tests.\"a\".\"ENVIRONMENT\"]"));
        assert!(
            error("schema = 2\n[tests.\"a\".\"e\"]\ntolerance = \"5%\"\n")
                .contains("set it in [tests.\"a\"]")
        );
        assert!(
            error("schema = 2\n[tests.\"a\".\"e\"]\nsites = [\"a.py f 3\"]\n").contains(
                "key tests.\"a\".\"e\".sites: must be an array of \"FILE:LINE FUNCTION BYTES\""
            )
        );
        assert!(error("schema = 2\nextra = 1\n").contains("key extra: unknown"));
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
                (proptest::collection::btree_map(
                    "(\\PC|[\"\\\\\u{e9}]){1,8}",
                    (proptest::array::uniform4(proptest::option::of(0..=i64::MAX as u64)),
                     proptest::array::uniform4(proptest::option::of(0..=i64::MAX as u64)),
                     proptest::collection::vec(("(\\PC|[\"\\\\ :]){1,8}", 0..100_000u32, "[a-z_<>.]{1,6}", 0..=i64::MAX as u64), 0..4)),
                    1..3,
                 ),
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
                    .map(|(id, (environments, tolerance, floor))| {
                        let environments = environments
                            .into_iter()
                            .map(|(key, (figures, spreads, sites))| {
                                let sites = sites
                                    .into_iter()
                                    .map(|(file, line, function, bytes)| Site { file, line, function, bytes })
                                    .collect();
                                (key, Entry { figures, spreads, sites })
                            })
                            .collect();
                        (id, Test { thresholds: thresholds(tolerance, floor), environments })
                    })
                    .collect(),
                one_environment: false,
            };
            let text = baseline.render();
            let fast = read_canonical(Path::new("b.toml"), &text, None);
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
            r#"(# [a-z\t\u{1}]{0,3}\n)?(schema = (1|1|2|2|2|3|"1")\n)?(\[defaults\]\n(tolerance = "[0-9]{1,2}%"\n)?)?"#,
            r#"(\[tests\."([a-z]|[a-z]|[a-z]|[a-z]|"|\\|\\u00[0-9a-f]{2}|\\[nt"\\]){1,4}"(\."(e|f|f|"|\\"|\\u00e9)")?\]\n"#,
            r#"((peak_bytes|leaked_bytes|allocations|rss_peak_bytes)(_spread)? = (0|[1-9][0-9]{0,17})\n"#,
            r#"|tolerance = "[0-9]{1,2}%"\n|floor = ("[0-9]{1,3} KiB"|[0-9]{1,5})\n"#,
            r#"|sites = \[("a:1 f 2"|"b\\"c:3 g 4"|", "|"x"|,){0,4}\]\n"#,
            r#"|([a-z]{1,2}|peak_bytes)( = |=| =)(-1|01|[0-9]|"x\\y")\n){0,4}\n?){0,3}"#,
        )) {
            if let Some(fast) = read_canonical(Path::new("b.toml"), &text, None) {
                let general = Baseline::parse_toml(Path::new("b.toml"), &text);
                proptest::prop_assert_eq!(general.ok(), Some(fast), "{}", text);
            }
        }
    }
}
