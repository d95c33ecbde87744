//! The results file that `pytest --memprof` writes (schema 1), and its crash-safe stream: the
//! schema's one definition, its one writer ([`Writer`], which the plugin drives, and
//! [`Results::save`], both in [`Results::write_document`]'s layout) and its reader.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::error::{read_text, write_atomically_with, Error, Result};
use crate::model::figure::Figure;

pub const SCHEMA: u64 = 1;
/// The environment of results that name none.
pub const UNKNOWN_ENVIRONMENT: &str = "unknown";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Site {
    pub file: String,
    pub line: u32,
    pub function: String,
    pub bytes: u64,
}

/// One test's figures. Unknown keys are kept, so a merge loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaked_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_peak_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_delta_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_sites: Vec<Site>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub crashed: bool,
    /// The memlimit limits the test ran with, as the plugin wrote them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Value>,
    /// Every other key (`first_use`, `rss_sampled`, a newer writer's), as written.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What the gate reads of a test, and no more: `memgauge compare` of 100,000 tests holds a
/// third of the memory it would with whole records (the rest is skipped unread, and the sites
/// are kept as text until a regression's report reads them).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GateRecord {
    /// Whether the test passed (its `outcome`, required as in a whole record, read without a
    /// copy): a baseline learns only from tests that passed.
    #[serde(rename = "outcome", deserialize_with = "passed")]
    pub passed: bool,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub line: Option<u32>,
    #[serde(default)]
    pub peak_bytes: Option<u64>,
    #[serde(default)]
    pub leaked_bytes: Option<u64>,
    #[serde(default)]
    pub rss_peak_bytes: Option<u64>,
    #[serde(default)]
    pub allocations: Option<u64>,
    /// The lines at the peak, kept as their JSON text: read only for a regression's report.
    #[serde(default)]
    pub top_sites: Option<Box<serde_json::value::RawValue>>,
}

fn passed<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<bool, D::Error> {
    let outcome = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
    Ok(outcome == "passed")
}

impl GateRecord {
    /// The lines that held the most at the peak; none if the file's are not readable.
    pub fn sites(&self) -> Vec<Site> {
        self.top_sites
            .as_ref()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or_default()
    }
}

/// A record type a results file can be read into: [`TestRecord`], or [`GateRecord`].
pub trait Record: serde::de::DeserializeOwned + Default {
    /// The record of a test that was running when its process died.
    fn crashed() -> Self;
    fn figure(&self, figure: Figure) -> Option<u64>;
    fn file(&self) -> Option<&str>;
    fn line(&self) -> Option<u32>;
}

/// The accessors both record types share: the same fields under the same names.
macro_rules! record_fields {
    () => {
        fn figure(&self, figure: Figure) -> Option<u64> {
            match figure {
                Figure::Peak => self.peak_bytes,
                Figure::Leaked => self.leaked_bytes,
                Figure::Rss => self.rss_peak_bytes,
                Figure::Allocations => self.allocations,
            }
        }

        fn file(&self) -> Option<&str> {
            self.file.as_deref()
        }

        fn line(&self) -> Option<u32> {
            self.line
        }
    };
}

impl Record for TestRecord {
    fn crashed() -> Self {
        TestRecord {
            outcome: "error".to_owned(),
            crashed: true,
            ..TestRecord::default()
        }
    }

    record_fields!();
}

impl Record for GateRecord {
    fn crashed() -> Self {
        GateRecord::default()
    }

    record_fields!();
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Results<R = TestRecord> {
    pub schema: u64,
    #[serde(default)]
    pub tool: Map<String, Value>,
    #[serde(default)]
    pub environment: Map<String, Value>,
    /// `K/N` when the run was shard K of N (`--memprof-shard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// What the figures include: how the collector, the seeds and first uses were handled.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub determinism: Map<String, Value>,
    pub tests: BTreeMap<String, R>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub benchmarks: BTreeMap<String, R>,
}

impl<R: Record> Results<R> {
    /// Parses a results document or, for a run that died, its `.partial` stream.
    pub fn parse(path: &Path, text: &str) -> Result<Results<R>> {
        if is_stream(text) {
            return Self::parse_stream(path, text);
        }
        match serde_json::from_str::<Results<R>>(text) {
            Ok(results) if results.schema == SCHEMA => Ok(results),
            // Checked after a failed or foreign parse, so an unknown schema is reported as such
            // rather than as whatever key it renamed (one pass over the text when all is well).
            parsed => {
                Self::check_schema(path, text)?;
                parsed.map_err(|e| {
                    Error::invalid(
                        path,
                        format!("{e}: the file does not follow results schema {SCHEMA}"),
                    )
                })
            }
        }
    }

    fn check_schema(path: &Path, text: &str) -> Result<()> {
        #[derive(Deserialize)]
        struct Probe {
            schema: Option<Value>,
        }
        let probe: Probe = serde_json::from_str(text).map_err(|e| Error::json(path, &e))?;
        let schema = probe.schema.ok_or_else(|| {
            Error::invalid(path, "no \"schema\" key: is this a memgauge results file?")
        })?;
        if schema.as_u64() != Some(SCHEMA) {
            return Err(Error::invalid(
                path,
                format!("key \"schema\": version {schema} is not one this memgauge reads ({SCHEMA}); upgrade memgauge"),
            ));
        }
        Ok(())
    }

    fn parse_stream(path: &Path, text: &str) -> Result<Results<R>> {
        let mut results = Results {
            schema: SCHEMA,
            ..Results::default()
        };
        let mut running: Option<String> = None;
        for (index, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let event: Value = serde_json::from_str(line).map_err(|e| Error::Json {
                path: path.to_owned(),
                line: index + 1,
                column: e.column(),
                message: e.to_string(),
            })?;
            let id = event.get("id").and_then(Value::as_str).map(str::to_owned);
            match (event.get("event").and_then(Value::as_str), id) {
                (Some("session"), _) => {
                    if let Some(Value::Object(env)) = event.get("environment") {
                        results.environment = env.clone();
                    }
                    results.shard = event
                        .get("shard")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                (Some("start"), Some(id)) => running = Some(id),
                (Some(kind @ ("test" | "benchmark")), Some(id)) => {
                    let mut record = event.as_object().cloned().unwrap_or_default();
                    record.remove("event");
                    record.remove("id");
                    let record: R = serde_json::from_value(Value::Object(record))
                        .map_err(|e| Error::invalid(path, format!("line {}: {e}", index + 1)))?;
                    if kind == "benchmark" {
                        results.benchmarks.insert(id, record);
                        continue;
                    }
                    if running.as_deref() == Some(&id) {
                        running = None;
                    }
                    results.tests.insert(id, record);
                }
                _ => {
                    return Err(Error::invalid(
                        path,
                        format!("line {}: not a memgauge event", index + 1),
                    ));
                }
            }
        }
        if let Some(id) = running {
            // The run died while this test ran: it never reported.
            results.tests.entry(id).or_insert_with(R::crashed);
        }
        Ok(results)
    }

    pub fn load(path: &Path) -> Result<Results<R>> {
        Self::parse(path, &Self::read(path)?)
    }

    /// A results file's text; a missing file's error says how to make it, or where the
    /// partial results of a run that died are.
    pub fn read(path: &Path) -> Result<String> {
        let partial = partial_path(path);
        let hint = if partial.exists() {
            format!(
                "; the run that writes it did not finish, and its partial results are in {}: \
                 pass that file to use them",
                partial.display()
            )
        } else {
            "; run `pytest --memprof` first, or name the results file".to_owned()
        };
        read_text(path, &hint)
    }

    /// The environment the figures were measured in (`environment.key`, which the plugin
    /// writes): the baseline keeps each environment's figures apart. Results without one (a
    /// file made by hand, or by an earlier memgauge) are of environment `unknown`.
    pub fn environment_key(&self, path: &Path) -> Result<&str> {
        environment_key(path, &self.environment)
    }

    /// The shard this run was, as (K, N); `None` when it was not one.
    pub fn shard(&self, path: &Path) -> Result<Option<(u32, u32)>> {
        shard(path, self.shard.as_deref())
    }

    /// Tests and benchmarks, under one namespace: benchmarks are gated like tests.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &R)> {
        self.tests.iter().chain(self.benchmarks.iter())
    }
}

fn environment_key<'m>(path: &Path, environment: &'m Map<String, Value>) -> Result<&'m str> {
    match environment.get("key") {
        None => Ok(UNKNOWN_ENVIRONMENT),
        Some(Value::String(key)) if is_environment_key(key) => Ok(key),
        Some(other) => Err(Error::invalid(
            path,
            format!(
                "key \"environment\".\"key\": {other} is not an environment key: one or more \
                 ASCII letters, digits, '.', '_', '+' and '-' (--memprof-environment sets it)"
            ),
        )),
    }
}

/// What `--memprof-native` appends to a run's environment key: figures that include native
/// allocations are kept apart from those that do not.
pub const NATIVE_SUFFIX: &str = "+native";

/// The same environment traced the other way: with native allocations if `key` is without,
/// and without if it is with.
pub fn other_tracing(key: &str) -> String {
    match key.strip_suffix(NATIVE_SUFFIX) {
        Some(without) => without.to_owned(),
        None => format!("{key}{NATIVE_SUFFIX}"),
    }
}

/// An environment key names a table in the baseline and a section of a pull request comment
/// (from a fork's artifact, too): letters, digits and `._+-` only, so it needs no escaping.
fn is_environment_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

fn shard(path: &Path, text: Option<&str>) -> Result<Option<(u32, u32)>> {
    let Some(text) = text else {
        return Ok(None);
    };
    let parsed = text
        .split_once('/')
        .and_then(|(k, n)| Some((k.parse::<u32>().ok()?, n.parse::<u32>().ok()?)))
        .filter(|&(k, n)| 1 <= k && k <= n);
    parsed.map(Some).ok_or_else(|| {
        Error::invalid(
            path,
            format!("key \"shard\": {text:?} is not K/N with 1 <= K <= N"),
        )
    })
}

/// Whether a results text is the stream a run writes as it goes (`.partial`).
fn is_stream(text: &str) -> bool {
    let first_line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    first_line.contains("\"event\"") && !first_line.contains("\"schema\"")
}

/// What a results file says of itself, read without its tests: its environment.
#[derive(Debug, Default, Deserialize)]
pub struct Head {
    #[serde(default)]
    environment: Map<String, Value>,
}

impl Head {
    /// Reads the head of a results text: one scan, no records built (for a stream, its first
    /// line). A text that is not valid results gets its error from [`Results::parse`] later.
    pub fn read(text: &str) -> Head {
        if is_stream(text) {
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            return serde_json::from_str(first).unwrap_or_default();
        }
        // The plugin writes the head on the first lines and the tests after `,\n"tests"`: that
        // prefix, closed, is the head, read without scanning the tests. (A newline cannot be in
        // a JSON string, and a cut inside a nested value leaves it unclosed: then the whole
        // text is scanned.)
        if let Some(end) = text.find(",\n\"tests\"") {
            if let Ok(head) = serde_json::from_str(&format!("{}}}", &text[..end])) {
                return head;
            }
        }
        serde_json::from_str(text).unwrap_or_default()
    }

    pub fn environment_key(&self, path: &Path) -> Result<&str> {
        environment_key(path, &self.environment)
    }
}

impl Results {
    /// Writes the document atomically, in the one layout every writer uses (see
    /// [`Results::write_document`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomically_with(path, |out| self.write_document(out))
    }

    /// The results document with one test per line: JSON that reads and diffs well, and whose
    /// head (everything but the tests and benchmarks) comes first, ended by `,\n"tests"`, which
    /// [`Head::read`] finds without scanning the tests.
    pub fn write_document(&self, out: &mut dyn Write) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct HeadOf<'a> {
            schema: u64,
            tool: &'a Map<String, Value>,
            environment: &'a Map<String, Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            shard: &'a Option<String>,
            #[serde(skip_serializing_if = "Map::is_empty")]
            determinism: &'a Map<String, Value>,
        }
        let head = serde_json::to_string(&HeadOf {
            schema: self.schema,
            tool: &self.tool,
            environment: &self.environment,
            shard: &self.shard,
            determinism: &self.determinism,
        })?;
        out.write_all(&head.as_bytes()[..head.len() - 1])?;
        let sections = [("tests", &self.tests), ("benchmarks", &self.benchmarks)];
        for (index, (name, entries)) in sections.into_iter().enumerate() {
            if index > 0 && entries.is_empty() {
                continue; // `tests` is always written, even empty.
            }
            write!(out, ",\n\"{name}\": {{")?;
            for (position, (id, record)) in entries.iter().enumerate() {
                out.write_all(if position == 0 { b"\n " } else { b",\n " })?;
                serde_json::to_writer(&mut *out, id)?;
                out.write_all(b": ")?;
                serde_json::to_writer(&mut *out, record)?;
            }
            out.write_all(b"\n}")?;
        }
        out.write_all(b"}\n")
    }
}

/// The results of a run as it goes: every record is written to the `.partial` stream as it
/// arrives (one write of a whole line, so a run that dies leaves whole lines), and the document
/// is written atomically at the end, the stream then removed. The plugin's one writer of the
/// results schema: it hands over records as JSON, which are read into [`TestRecord`] here, so
/// a record that does not follow the schema is refused when written, naming the test.
pub struct Writer {
    output: PathBuf,
    stream: Option<std::fs::File>,
    results: Results,
}

/// A stream event: `{"event": ..., "id": ..., the record's keys}`.
#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(flatten)]
    body: T,
}

impl Writer {
    /// Starts the stream beside `output` (`results.json.partial`), with the session's event.
    pub fn open(
        output: &Path,
        environment: Map<String, Value>,
        shard: Option<String>,
    ) -> Result<Writer> {
        let stream_path = partial_path(output);
        let write_error = |source| Error::Write {
            path: stream_path.clone(),
            source,
        };
        if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        let stream = std::fs::File::create(&stream_path).map_err(write_error)?;
        let mut writer = Writer {
            output: output.to_owned(),
            stream: Some(stream),
            results: Results {
                schema: SCHEMA,
                environment,
                shard,
                ..Results::default()
            },
        };
        #[derive(Serialize)]
        struct Session<'a> {
            environment: &'a Map<String, Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            shard: &'a Option<String>,
        }
        let session = Session {
            environment: &writer.results.environment,
            shard: &writer.results.shard,
        };
        let line = event_line("session", None, &session);
        writer.write_line(line)?;
        Ok(writer)
    }

    /// A test started: should the run die before it reports, the stream names it.
    pub fn start(&mut self, id: &str) -> Result<()> {
        self.write_line(event_line("start", Some(id), Map::new()))
    }

    /// A test's record, given as JSON; a second record for the same test replaces the first.
    pub fn test(&mut self, id: &str, record: &str) -> Result<()> {
        let record = self.parse(id, record)?;
        let line = event_line("test", Some(id), &record);
        self.results.tests.insert(id.to_owned(), record);
        self.write_line(line)
    }

    /// A benchmark's record (the `memit` fixture's), given as JSON.
    pub fn benchmark(&mut self, id: &str, record: &str) -> Result<()> {
        let record = self.parse(id, record)?;
        let line = event_line("benchmark", Some(id), &record);
        self.results.benchmarks.insert(id.to_owned(), record);
        self.write_line(line)
    }

    /// A test that reported passing failed later (an error in its teardown): its outcome
    /// becomes `error`. Returns whether the test had a record.
    pub fn mark_error(&mut self, id: &str) -> Result<bool> {
        let Some(record) = self.results.tests.get_mut(id) else {
            return Ok(false);
        };
        record.outcome = "error".to_owned();
        let line = event_line("test", Some(id), &*record);
        self.write_line(line)?;
        Ok(true)
    }

    /// Writes the document atomically and removes the stream.
    pub fn finish(
        mut self,
        tool: Map<String, Value>,
        determinism: Map<String, Value>,
    ) -> Result<()> {
        self.results.tool = tool;
        self.results.determinism = determinism;
        self.results.save(&self.output)?;
        self.stream = None;
        let _ = std::fs::remove_file(partial_path(&self.output));
        Ok(())
    }

    fn parse(&self, id: &str, record: &str) -> Result<TestRecord> {
        serde_json::from_str(record).map_err(|e| {
            Error::invalid(
                &partial_path(&self.output),
                format!("the record of {id:?} does not follow results schema {SCHEMA}: {e}"),
            )
        })
    }

    fn write_line(&mut self, mut line: Vec<u8>) -> Result<()> {
        line.push(b'\n');
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        stream.write_all(&line).map_err(|source| Error::Write {
            path: partial_path(&self.output),
            source,
        })
    }
}

fn event_line<T: Serialize>(event: &str, id: Option<&str>, body: T) -> Vec<u8> {
    serde_json::to_vec(&Event { event, id, body }).expect("an event serializes")
}

/// Where the stream of a run that writes `output` goes.
pub fn partial_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    output.with_file_name(format!("{name}.partial"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"schema": 1, "tool": {"name": "memgauge"}, "environment": {},
        "tests": {"t.py::a": {"outcome": "passed", "file": "t.py", "line": 3,
        "peak_bytes": 100, "leaked_bytes": 0, "allocated_bytes": 120, "allocations": 2,
        "rss_peak_bytes": 4096, "rss_delta_bytes": -4096, "duration_s": 0.5,
        "top_sites": [{"file": "t.py", "line": 4, "function": "a", "bytes": 100}],
        "limits": {}}}}"#;

    #[test]
    fn parses_and_keeps_unknown_keys() {
        let results = Results::<TestRecord>::parse(Path::new("r.json"), DOC).unwrap();
        let record = &results.tests["t.py::a"];
        assert_eq!(record.peak_bytes, Some(100));
        assert_eq!(record.rss_delta_bytes, Some(-4096));
        assert_eq!(record.top_sites[0].line, 4);
        assert!(record.limits.is_some());
    }

    #[test]
    fn a_newer_writers_keys_survive_a_round_trip() {
        let text = r#"{"schema": 1, "determinism": {"seed": 0}, "tests": {"t.py::a":
            {"outcome": "passed", "peak_bytes": 1, "rss_sampled": true,
             "first_use": {"leaked_bytes": 5, "what": ["import json"]}, "from_the_future": [1]}}}"#;
        let results = Results::<TestRecord>::parse(Path::new("r.json"), text).unwrap();
        let again: Value = serde_json::to_value(&results).unwrap();
        let record = &again["tests"]["t.py::a"];
        assert_eq!(record["rss_sampled"], Value::Bool(true));
        assert_eq!(record["first_use"]["what"][0], "import json");
        assert_eq!(record["from_the_future"][0], 1);
        assert_eq!(again["determinism"]["seed"], 0);
    }

    #[test]
    fn errors_name_the_file_and_position() {
        let error =
            Results::<TestRecord>::parse(Path::new("r.json"), "{\"schema\": 1,\n \"tests\": [}")
                .unwrap_err();
        assert!(error.to_string().starts_with("r.json:2:"), "{error}");
        let error =
            Results::<TestRecord>::parse(Path::new("r.json"), r#"{"schema": 7, "tests": {}}"#)
                .unwrap_err();
        assert!(
            error.to_string().contains("key \"schema\": version 7"),
            "{error}"
        );
        let error =
            Results::<TestRecord>::parse(Path::new("r.json"), r#"{"tests": {}}"#).unwrap_err();
        assert!(error.to_string().contains("no \"schema\" key"), "{error}");
        let error = Results::<TestRecord>::parse(
            Path::new("r.json"),
            r#"{"schema": 1, "tests": {"a": {"peak_bytes": -1}}}"#,
        )
        .unwrap_err();
        assert!(error.to_string().starts_with("r.json: "), "{error}");
    }

    #[test]
    fn a_stream_names_the_test_that_was_running() {
        let stream = "{\"event\": \"session\", \"environment\": {\"python\": \"3.11\"}}\n\
            {\"event\": \"start\", \"id\": \"t.py::a\"}\n\
            {\"event\": \"test\", \"id\": \"t.py::a\", \"outcome\": \"passed\", \"peak_bytes\": 5}\n\
            {\"event\": \"start\", \"id\": \"t.py::dies\"}\n\
            {\"event\": \"benchmark\", \"id\": \"t.py::dies::build\", \"outcome\": \"passed\", \"peak_bytes\": 7}\n";
        let results = Results::<TestRecord>::parse(Path::new("r.json.partial"), stream).unwrap();
        assert_eq!(results.tests["t.py::a"].peak_bytes, Some(5));
        assert_eq!(results.benchmarks["t.py::dies::build"].peak_bytes, Some(7));
        assert!(results.tests["t.py::dies"].crashed);
    }

    /// A fresh directory under the system's temporary one, for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("memgauge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_writer_streams_each_record_and_writes_the_document_in_one_layout() {
        let dir = scratch("writer");
        let output = dir.join("out").join("results.json");
        let environment: Map<String, Value> =
            serde_json::from_str(r#"{"key": "cp311-linux-x86_64"}"#).unwrap();
        let mut writer = Writer::open(&output, environment, Some("1/2".to_owned())).unwrap();
        writer.start("t.py::a").unwrap();
        writer
            .test(
                "t.py::a",
                r#"{"outcome": "passed", "peak_bytes": 5, "rss_sampled": true}"#,
            )
            .unwrap();
        writer.start("t.py::b").unwrap();
        // As it goes, the stream has the record and names the test that is running.
        let partial = partial_path(&output);
        let stream = Results::<TestRecord>::load(&partial).unwrap();
        assert_eq!(stream.tests["t.py::a"].peak_bytes, Some(5));
        assert!(stream.tests["t.py::b"].crashed);
        assert_eq!(stream.shard.as_deref(), Some("1/2"));
        // A record off the schema is refused, naming the test; nothing of it is kept.
        let error = writer
            .test("t.py::b", r#"{"outcome": "passed", "peak_bytes": -1}"#)
            .unwrap_err();
        assert!(error.to_string().contains("\"t.py::b\""), "{error}");
        writer
            .test("t.py::b", r#"{"outcome": "passed", "peak_bytes": 7}"#)
            .unwrap();
        assert!(writer.mark_error("t.py::b").unwrap());
        assert!(!writer.mark_error("t.py::never").unwrap());
        writer
            .benchmark(
                "t.py::a::build",
                r#"{"outcome": "passed", "peak_bytes": 9}"#,
            )
            .unwrap();
        let tool: Map<String, Value> = serde_json::from_str(r#"{"name": "memgauge"}"#).unwrap();
        let determinism: Map<String, Value> = serde_json::from_str(r#"{"seed": 0}"#).unwrap();
        writer.finish(tool, determinism).unwrap();
        assert!(
            !partial.exists(),
            "the stream goes once the document is written"
        );

        let text = std::fs::read_to_string(&output).unwrap();
        let results = Results::<TestRecord>::parse(&output, &text).unwrap();
        assert_eq!(results.tests["t.py::b"].outcome, "error");
        assert_eq!(
            results.tests["t.py::a"].extra["rss_sampled"],
            Value::Bool(true)
        );
        assert_eq!(results.benchmarks["t.py::a::build"].peak_bytes, Some(9));
        assert_eq!(results.determinism["seed"], 0);
        // One test per line, the head first: read without the tests.
        assert_eq!(
            text.lines().filter(|l| l.starts_with(" \"t.py::")).count(),
            3
        );
        let head = text
            .find(",\n\"tests\"")
            .expect("the head ends before the tests");
        assert!(!text[..head].contains("t.py::"));
        assert_eq!(
            Head::read(&text).environment_key(&output).unwrap(),
            "cp311-linux-x86_64"
        );
        // What `merge` saves is in the same layout, and reads back the same.
        let merged = dir.join("merged.json");
        results.save(&merged).unwrap();
        assert_eq!(std::fs::read_to_string(&merged).unwrap(), text);
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,200}") {
            let _ = Results::<TestRecord>::parse(Path::new("fuzz.json"), &text);
            let _ = Results::<GateRecord>::parse(Path::new("fuzz.json"), &text);
        }

        #[test]
        fn never_panics_on_json_shaped_text(text in r#"\{"schema": ?1, "tests": \{("[a-z:]{1,5}": \{"outcome": "[a-z]{0,6}"(, "[a-z_]{1,12}": (-?[0-9]{1,22}|"x"|null|\[\]))*\})?\}\}"#) {
            let _ = Results::<TestRecord>::parse(Path::new("fuzz.json"), &text);
            let _ = Results::<GateRecord>::parse(Path::new("fuzz.json"), &text);
        }
    }
}
