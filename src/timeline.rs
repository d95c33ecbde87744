//! Memory over time for a whole command: `memgauge run` records, `peak`, `list` and `plot` read.
//!
//! A run file is JSON Lines, streamed as the command runs so a run that dies keeps its samples:
//! - `{"event": "run", "command": [...], "started": <unix seconds>, "interval_s": .., "pid": ..}`
//! - `{"t": <seconds since start>, "rss": [[pid, bytes], ...]}`, one per sample, the command's
//!   own process first; on Linux each figure is the peak since the previous sample (the
//!   kernel's high water mark, reset after each read), so no spike falls between two samples;
//!   elsewhere, or where the reset is refused, the RSS at that instant;
//! - `{"event": "test", "id": .., "start": <unix s>, "end": <unix s>, "pid": ..}`, appended by
//!   the pytest plugin when it runs under `memgauge run` (`MEMGAUGE_RUN_FILE`);
//! - `{"event": "exit", "t": .., "code": .., "sampler_cpu_s": .., "samples": "peak"|"instant"}`
//!   at the end ("instant" when any sample was not a peak).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus as ProcessStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::engine::proc::ProcessResident;
use crate::engine::rss::SAMPLE_RSS_ENV;
use crate::gate::render::xml_escape as escape;
use crate::model::error::{read_text, Error, Result};

/// The environment variable that tells the pytest plugin where to write test spans.
pub const RUN_FILE_ENV: &str = "MEMGAUGE_RUN_FILE";
pub const RUNS_DIR: &str = ".memgauge/runs";

/// What `memgauge run` does.
pub struct RunOptions {
    pub command: Vec<String>,
    pub interval: Duration,
    pub include_children: bool,
    pub output: PathBuf,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `run-YYYYmmdd-HHMMSS.jsonl` for now (UTC), the default name of a run file.
pub fn default_run_name() -> String {
    let seconds = unix_now() as i64;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "run-{year:04}{month:02}{day:02}-{:02}{:02}{:02}.jsonl",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn append(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    file.write_all(bytes).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

fn write_line(file: &mut File, path: &Path, value: &Value) -> Result<()> {
    append(file, path, format!("{value}\n").as_bytes())
}

/// How often sampled lines are written out.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How often the list of descendants is read again (it costs a directory walk).
const CHILDREN_EVERY: Duration = Duration::from_millis(20);

/// Reads the RSS of the command and its descendants, keeping what each read needs open (on
/// Linux its `statm`, on Windows its handle).
struct Sampler {
    root: u32,
    include_children: bool,
    processes: Vec<ProcessResident>,
    children_read: Option<Instant>,
    /// Whether some sample was the RSS at that instant rather than the peak since the one
    /// before (the OS keeps no resettable mark, or refused the reset).
    instant: bool,
}

impl Sampler {
    fn new(root: u32, include_children: bool) -> Self {
        Sampler {
            root,
            include_children,
            processes: Vec::new(),
            children_read: None,
            instant: false,
        }
    }

    fn refresh(&mut self) {
        let mut pids = vec![self.root];
        if self.include_children {
            pids.extend(crate::engine::proc::descendants(self.root));
        }
        self.processes
            .retain(|process| pids.contains(&process.pid()));
        for pid in pids {
            if !self.processes.iter().any(|known| known.pid() == pid) {
                if let Some(process) = ProcessResident::open(pid) {
                    self.processes.push(process);
                }
            }
        }
        self.children_read = Some(Instant::now());
    }

    /// Appends a sample line for time `t` to `line` (nothing when no process could be read).
    fn sample(&mut self, t: f64, line: &mut String) {
        let due = self.children_read.map_or(true, |at| {
            self.include_children && at.elapsed() >= CHILDREN_EVERY
        });
        if due {
            self.refresh();
        }
        let mut entries = String::new();
        let mut gone = Vec::new();
        for process in &mut self.processes {
            // A process that exited but is not reaped yet reads as 0 pages: it is gone.
            let peak = process.read_peak();
            let bytes = peak.or_else(|| process.read()).filter(|&bytes| bytes > 0);
            // An exited process has no mark to read: only a live one's instant read counts.
            self.instant |= peak.is_none() && bytes.is_some();
            match bytes {
                Some(bytes) => {
                    let comma = if entries.is_empty() { "" } else { "," };
                    let _ = write!(entries, "{comma}[{},{bytes}]", process.pid());
                }
                None => gone.push(process.pid()),
            }
        }
        self.processes
            .retain(|process| !gone.contains(&process.pid()));
        if !entries.is_empty() {
            let _ = writeln!(line, r#"{{"t":{t:.6},"rss":[{entries}]}}"#);
        }
    }
}

/// Runs the command, sampling RSS into the run file; returns the command's exit code.
pub fn record(options: &RunOptions) -> Result<i32> {
    let path = &options.output;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| Error::Write {
            path: parent.to_owned(),
            source,
        })?;
    }
    // Emptied, then appended to, so the test spans other processes add land whole between
    // samples.
    let mut file = File::create(path)
        .and_then(|_| OpenOptions::new().append(true).open(path))
        .map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })?;
    let (program, args) = options.command.split_first().ok_or_else(|| {
        Error::Usage("memgauge run: no command given (memgauge run -- CMD ...)".into())
    })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
    let started = unix_now();
    let clock = Instant::now();
    let cpu_before = crate::engine::ffi::own_cpu_seconds();
    let mut child = Command::new(program)
        .args(args)
        .env(RUN_FILE_ENV, &absolute)
        // The run resets each process's high water mark after every sample; the plugin then
        // samples its per-test RSS peaks rather than resetting the same mark under the run.
        .env(SAMPLE_RSS_ENV, "1")
        .spawn()
        .map_err(|source| {
            Error::Usage(format!("memgauge run: cannot start {program}: {source}"))
        })?;
    let pid = child.id();
    let mut pending = String::new();
    write_line(
        &mut file,
        path,
        &json!({"event": "run", "command": options.command, "started": started,
                "interval_s": options.interval.as_secs_f64(), "pid": pid,
                "include_children": options.include_children}),
    )?;

    let mut sampler = Sampler::new(pid, options.include_children);
    let mut line = String::new();
    let mut flushed = clock;
    let mut next = clock;
    let status: ProcessStatus = loop {
        let t = clock.elapsed().as_secs_f64();
        line.clear();
        sampler.sample(t, &mut line);
        let exited = match child.try_wait() {
            Ok(status) => status,
            Err(source) => {
                return Err(Error::Usage(format!(
                    "memgauge run: lost the command: {source}"
                )))
            }
        };
        // Written in batches of FLUSH_EVERY: a run killed midway loses at most that much.
        if !line.is_empty() {
            pending.push_str(&line);
        }
        if exited.is_some() || flushed.elapsed() >= FLUSH_EVERY {
            append(&mut file, path, pending.as_bytes())?;
            pending.clear();
            flushed = Instant::now();
        }
        if let Some(status) = exited {
            break status;
        }
        next += options.interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    };
    let code = exit_code(status);
    let cpu = match (cpu_before, crate::engine::ffi::own_cpu_seconds()) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    append(&mut file, path, pending.as_bytes())?;
    write_line(
        &mut file,
        path,
        &json!({"event": "exit", "t": clock.elapsed().as_secs_f64(), "code": code,
                "sampler_cpu_s": cpu,
                "samples": if sampler.instant { "instant" } else { "peak" }}),
    )?;
    Ok(code)
}

/// The code a shell would report: the exit code, or 128 + the signal that killed it.
fn exit_code(status: ProcessStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return 128 + signal;
        }
    }
    status.code().unwrap_or(1)
}

/// A test's span, in seconds since the run started.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub id: String,
    pub start: f64,
    pub end: f64,
}

/// A run file, read back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    pub command: Vec<String>,
    pub started: f64,
    pub root_pid: u32,
    /// Sample times, and per process its RSS at each (None where it did not exist).
    pub times: Vec<f64>,
    pub processes: BTreeMap<u32, Vec<Option<u64>>>,
    pub spans: Vec<Span>,
    pub exit_code: Option<i32>,
    pub sampler_cpu_s: Option<f64>,
    pub duration_s: f64,
    /// Whether each sample is the peak since the one before (the exit line says so).
    pub peaks: bool,
}

impl Run {
    /// The plot's title when none is given: the command that ran.
    pub fn title(&self) -> String {
        format!("memgauge run: {}", self.command.join(" "))
    }

    pub fn load(path: &Path) -> Result<Run> {
        let text = read_text(path, ": record one with `memgauge run -- COMMAND`")?;
        let mut run = Run::default();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = match serde_json::from_str(line) {
                Ok(value) => value,
                // A run killed mid-write leaves a cut last line: the samples before it stand.
                Err(error) if error.is_eof() => break,
                Err(error) => {
                    return Err(Error::Json {
                        path: path.to_owned(),
                        line: index + 1,
                        column: error.column(),
                        message: error.to_string(),
                    })
                }
            };
            run.add(&value).map_err(|message| {
                Error::invalid(path, format!("line {}: {message}", index + 1))
            })?;
        }
        if run.started == 0.0 {
            return Err(Error::invalid(
                path,
                "no \"run\" line: is this a file written by `memgauge run`?",
            ));
        }
        Ok(run)
    }

    fn add(&mut self, value: &Value) -> std::result::Result<(), String> {
        let number = |key: &str| value.get(key).and_then(Value::as_f64);
        match value.get("event").and_then(Value::as_str) {
            Some("run") => {
                self.started = number("started").ok_or("\"run\" without \"started\"")?;
                self.root_pid = number("pid").unwrap_or(0.0) as u32;
                self.command = value
                    .get("command")
                    .and_then(Value::as_array)
                    .map(|words| {
                        words
                            .iter()
                            .filter_map(|w| w.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            Some("test") => {
                let id = value
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or("test without \"id\"")?;
                let (start, end) = (
                    number("start").ok_or("test without \"start\"")?,
                    number("end").ok_or("test without \"end\"")?,
                );
                self.spans.push(Span {
                    id: id.to_owned(),
                    start: start - self.started,
                    end: end - self.started,
                });
            }
            Some("exit") => {
                self.exit_code = number("code").map(|c| c as i32);
                self.sampler_cpu_s = number("sampler_cpu_s");
                self.peaks = value.get("samples").and_then(Value::as_str) == Some("peak");
                self.duration_s = number("t").unwrap_or(self.duration_s);
            }
            Some(other) => return Err(format!("unknown event {other:?}")),
            None => {
                let t = number("t").ok_or("a sample without \"t\"")?;
                let rss = value
                    .get("rss")
                    .and_then(Value::as_array)
                    .ok_or("a sample without \"rss\"")?;
                let index = self.times.len();
                self.times.push(t);
                self.duration_s = self.duration_s.max(t);
                for pair in rss {
                    let (Some(pid), Some(bytes)) = (
                        pair.get(0).and_then(Value::as_u64),
                        pair.get(1).and_then(Value::as_u64),
                    ) else {
                        return Err("an \"rss\" entry is not [pid, bytes]".to_owned());
                    };
                    let series = self.processes.entry(pid as u32).or_default();
                    series.resize(index, None);
                    series.push(Some(bytes));
                }
            }
        }
        Ok(())
    }

    /// The total RSS (all processes) at each sample.
    pub fn totals(&self) -> Vec<u64> {
        (0..self.times.len())
            .map(|i| {
                self.processes
                    .values()
                    .filter_map(|series| series.get(i).copied().flatten())
                    .sum()
            })
            .collect()
    }

    /// The highest total RSS and when (seconds since start).
    pub fn peak(&self) -> Option<(f64, u64)> {
        self.totals()
            .into_iter()
            .enumerate()
            .max_by_key(|&(i, bytes)| (bytes, std::cmp::Reverse(i)))
            .map(|(i, bytes)| (self.times[i], bytes))
    }
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// Memory against time as a self-contained SVG: one line per process (and their sum when
/// there are several), the peak marked, test spans shaded and labelled.
pub fn svg(run: &Run, title: &str) -> String {
    let (width, height) = (960.0, 480.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let totals = run.totals();
    let max_bytes = totals.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.05;
    let max_t = run.duration_s.max(1e-3);
    let x = |t: f64| left + t / max_t * plot_w;
    let y = |bytes: f64| top + plot_h - bytes / max_bytes * plot_h;
    let mib = |bytes: f64| bytes / 1_048_576.0;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (index, span) in run.spans.iter().enumerate() {
        let (x0, x1) = (x(span.start.max(0.0)), x(span.end.min(max_t)));
        let _ = writeln!(
            out,
            r##"<g class="test"><rect x="{x0:.1}" y="{top}" width="{:.1}" height="{plot_h}" fill="{}" fill-opacity="0.12"><title>{}</title></rect><text x="{:.1}" y="{:.1}" font-size="9" fill="#555" transform="rotate(-90 {:.1} {:.1})">{}</text></g>"##,
            (x1 - x0).max(0.5),
            if index % 2 == 0 { "#4c72b0" } else { "#dd8452" },
            escape(&span.id),
            x0 + 10.0,
            top + plot_h - 4.0,
            x0 + 10.0,
            top + plot_h - 4.0,
            escape(span.id.rsplit("::").next().unwrap_or(&span.id)),
        );
    }
    // Axes and gridlines.
    for step in 0..=4 {
        let bytes = max_bytes * f64::from(step) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{:.0} MiB</text>"##,
            left + plot_w,
            y(bytes),
            y(bytes),
            left - 6.0,
            y(bytes) + 4.0,
            mib(bytes)
        );
        let t = max_t * f64::from(step) / 4.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.1} s</text>"#,
            x(t),
            top + plot_h + 18.0,
            t
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">time</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        height - 8.0,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        if run.peaks {
            "RSS (peak of each interval)"
        } else {
            "RSS (sampled)"
        }
    );
    let polyline = |points: Vec<(f64, f64)>, color: &str, width: f64, label: &str| {
        let points: Vec<String> = points
            .into_iter()
            .map(|(t, b)| format!("{:.1},{:.1}", x(t), y(b)))
            .collect();
        format!(
            r#"<polyline class="series" fill="none" stroke="{color}" stroke-width="{width}" points="{}"><title>{}</title></polyline>"#,
            points.join(" "),
            escape(label)
        )
    };
    let mut legend = Vec::new();
    for (index, (pid, series)) in run.processes.iter().enumerate() {
        let points = run
            .times
            .iter()
            .zip(series)
            .filter_map(|(&t, bytes)| bytes.map(|b| (t, b as f64)))
            .collect();
        let color = COLORS[index % COLORS.len()];
        let label = if *pid == run.root_pid {
            format!("pid {pid} (command)")
        } else {
            format!("pid {pid}")
        };
        let _ = writeln!(out, "{}", polyline(points, color, 1.5, &label));
        legend.push((color, label));
    }
    if run.processes.len() > 1 {
        let points = run
            .times
            .iter()
            .zip(&totals)
            .map(|(&t, &b)| (t, b as f64))
            .collect();
        let _ = writeln!(out, "{}", polyline(points, "black", 2.0, "all processes"));
        legend.push(("black", "all processes".to_owned()));
    }
    for (index, (color, label)) in legend.iter().enumerate() {
        let ly = top + 14.0 + 16.0 * index as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{}" y="{:.1}">{}</text>"#,
            left + 10.0,
            left + 30.0,
            left + 36.0,
            ly + 4.0,
            escape(label)
        );
    }
    if let Some((t, bytes)) = run.peak() {
        let _ = writeln!(
            out,
            r#"<g class="peak"><circle cx="{:.1}" cy="{:.1}" r="4" fill="red"/><text x="{:.1}" y="{:.1}" fill="red">peak {:.1} MiB at {:.2} s</text></g>"#,
            x(t),
            y(bytes as f64),
            x(t) + 6.0,
            y(bytes as f64) - 6.0,
            mib(bytes as f64),
            t
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = r#"{"event": "run", "command": ["python", "x.py"], "started": 1000.0, "interval_s": 0.01, "pid": 7}
{"t": 0.0, "rss": [[7, 100]]}
{"t": 0.5, "rss": [[7, 300], [8, 1000]]}
{"event": "test", "id": "t.py::a<b>", "start": 1000.1, "end": 1000.4, "pid": 7}
{"t": 1.0, "rss": [[7, 200]]}
{"event": "exit", "t": 1.0, "code": 3, "sampler_cpu_s": 0.01, "samples": "peak"}
{"t": 1.1, "rss": [[7, 2"#;

    #[test]
    fn reads_samples_spans_and_a_cut_last_line() {
        let path = std::env::temp_dir().join(format!("memgauge-run-{}.jsonl", std::process::id()));
        std::fs::write(&path, RUN).unwrap();
        let run = Run::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(run.command, ["python", "x.py"]);
        assert_eq!(run.times, [0.0, 0.5, 1.0]);
        assert_eq!(run.processes[&8], [None, Some(1000)]);
        assert_eq!(run.totals(), [100, 1300, 200]);
        assert_eq!(run.peak(), Some((0.5, 1300)));
        assert_eq!(run.exit_code, Some(3));
        assert!(run.peaks);
        assert!((run.spans[0].start - 0.1).abs() < 1e-9);
        let svg = svg(&run, "a & b");
        assert!(svg.contains("a &amp; b") && svg.contains("t.py::a&lt;b&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("peak 0.0 MiB at 0.50 s"));
        assert!(svg.contains("RSS (peak of each interval)"));
    }

    #[test]
    fn a_file_that_is_not_a_run_is_an_error_naming_it() {
        let path =
            std::env::temp_dir().join(format!("memgauge-notrun-{}.jsonl", std::process::id()));
        std::fs::write(&path, "{\"t\": 1, \"rss\": []}\n").unwrap();
        let error = Run::load(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            error.contains("memgauge-notrun") && error.contains("memgauge run"),
            "{error}"
        );
    }

    #[test]
    fn default_names_carry_the_date() {
        let name = default_run_name();
        assert!(
            name.starts_with("run-20") && name.ends_with(".jsonl"),
            "{name}"
        );
        assert_eq!(name.len(), "run-20261124-153000.jsonl".len());
    }
}
