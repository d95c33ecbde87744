//! The `memgauge` command line: one entry, [`run`], for the binary and the Python console script.
//!
//! Exit codes ([`ExitStatus`]): 0 everything is within its limits, 1 a regression was found (or
//! `baseline update --check` found the baseline out of date), 2 the input or the command was wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::gate::compare::{self, Figure, Policy};
use crate::gate::render::{self, Format};
use crate::model::baseline::{self, Baseline};
use crate::model::error::{read_text, write_atomically, write_atomically_with, Error, Result};
use crate::model::results::{other_tracing, GateRecord, Head, Record, Results, NATIVE_SUFFIX};
use crate::model::size;
use crate::timeline;

/// How the command ended; the process exits with its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: everything is within its limits.
    Success,
    /// 1: a regression was found.
    Regression,
    /// 2: the input or the command was wrong.
    Error,
    /// `memgauge run`: the exit code of the command it ran.
    Command(i32),
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Regression => 1,
            ExitStatus::Error => 2,
            ExitStatus::Command(code) => code,
        }
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(status: ExitStatus) -> Self {
        std::process::ExitCode::from(status.code().clamp(0, 255) as u8)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "memgauge",
    version,
    about = "Memory figures for Python test suites, gated in CI",
    after_help = "Exit codes: 0 within limits, 1 regression found, 2 bad input or command.\n\
                  Defaults come from [tool.memgauge] in ./pyproject.toml."
)]
struct Cli {
    /// The pyproject.toml whose [tool.memgauge] gives defaults.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compare a results file with the baseline; exit 1 on a regression.
    Compare(CompareArgs),
    /// Write or check the baseline.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Join results files (CI shards, a matrix) into one.
    Merge(MergeArgs),
    /// Show the per-test figures of a results file, without gating.
    Report(ReportArgs),
    /// Run a command and record its RSS (and its children's) over time.
    Run(RunArgs),
    /// Draw a recorded run as SVG: memory against time, the peak, the tests.
    Plot(PlotArgs),
    /// Print the peak RSS of recorded runs.
    Peak(PeakArgs),
    /// List the recorded runs in .memgauge/runs.
    List,
    /// Delete the recorded runs in .memgauge/runs.
    Clean,
}

#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
struct RunArgs {
    /// Time between samples: 10ms, 1ms, 0.5s; a bare number is seconds.
    #[arg(long, default_value = "10ms", value_parser = parse_interval)]
    interval: std::time::Duration,
    /// Also sample every process the command starts, and theirs.
    #[arg(long, short = 'C')]
    include_children: bool,
    /// The run file [default: .memgauge/runs/run-<date>-<time>.jsonl].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The command and its arguments (after --).
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// A run file [default: the latest in .memgauge/runs].
    file: Option<PathBuf>,
    /// The SVG to write [default: the run file with .svg].
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[arg(long)]
    title: Option<String>,
}

#[derive(Debug, Args)]
struct PeakArgs {
    /// Run files [default: the latest in .memgauge/runs].
    files: Vec<PathBuf>,
}

fn parse_interval(text: &str) -> std::result::Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an interval: write 10ms, 1ms or 0.5s"))?;
    if !(value > 0.0 && value.is_finite()) {
        return Err(format!("{text:?}: the interval must be above zero"));
    }
    Ok(std::time::Duration::from_secs_f64(value * scale))
}

/// The recorded runs, oldest first.
fn recorded_runs() -> Vec<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(timeline::RUNS_DIR)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    runs.sort();
    runs
}

fn latest_run() -> Result<PathBuf> {
    recorded_runs().pop().ok_or_else(|| {
        Error::Usage(format!(
            "no recorded runs in {}: record one with `memgauge run -- COMMAND`",
            timeline::RUNS_DIR
        ))
    })
}

fn run_plot(args: PlotArgs) -> Result<ExitStatus> {
    let file = match args.file {
        Some(file) => file,
        None => latest_run()?,
    };
    let output = args.output.unwrap_or_else(|| file.with_extension("svg"));
    if output.extension().map_or(true, |ext| ext != "svg") {
        return Err(Error::Usage(format!(
            "{}: memgauge plot writes SVG (a browser shows it; rsvg-convert makes a PNG of it)",
            output.display()
        )));
    }
    let run = timeline::Run::load(&file)?;
    let title = args.title.unwrap_or_else(|| run.title());
    write_atomically(&output, timeline::svg(&run, &title).as_bytes())?;
    println!("memgauge: wrote {}", output.display());
    Ok(ExitStatus::Success)
}

fn describe_peak(path: &Path, run: &timeline::Run) -> String {
    match run.peak() {
        Some((t, bytes)) => format!(
            "{}\tpeak {} at {t:.2} s ({} processes)",
            path.display(),
            size::format_size(bytes),
            run.processes.len()
        ),
        None => format!("{}\tno samples", path.display()),
    }
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The results of `pytest --memprof` [default: .memgauge/results.json]: one file, or a
    /// matrix's and shards' files. Each environment's shards are joined, and each environment is
    /// gated against its own figures in the baseline.
    results: Vec<PathBuf>,
    /// The baseline [default: memgauge-baseline.toml].
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Also write JUnit XML here.
    #[arg(long, value_name = "PATH")]
    junit: Option<PathBuf>,
    /// Also write the Markdown report here (the pull request comment).
    #[arg(long, value_name = "PATH")]
    markdown: Option<PathBuf>,
    /// Exit 2 when the baseline has no figures for an environment of the results (by default
    /// such an environment is reported, and gates nothing).
    #[arg(long)]
    require_baseline: bool,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    gating: GateOptions,
}

/// What counts as a regression; each falls back to [tool.memgauge], then the baseline's
/// [defaults].
#[derive(Debug, Default, Args)]
struct GateOptions {
    /// Relative growth allowed, e.g. 10% [default: 10%].
    #[arg(long)]
    tolerance: Option<String>,
    /// Absolute growth always allowed, e.g. "64 KiB" [default: 64 KiB].
    #[arg(long)]
    floor: Option<String>,
    /// Figures to gate, comma-separated: peak, leaked, rss, allocations [default: peak,leaked].
    #[arg(long)]
    gate: Option<String>,
}

#[derive(Debug, Subcommand)]
enum BaselineCommand {
    /// Write the baseline from a results file and print the diff.
    Update(UpdateArgs),
}

#[derive(Debug, Args)]
struct UpdateArgs {
    /// Results files [default: .memgauge/results.json]. Each updates the figures of its own
    /// environment (a matrix's files update one environment each). Several of one environment
    /// are shards or reruns: each figure is the median of the files that have the test, and
    /// what it moved across them is kept as its spread.
    results: Vec<PathBuf>,
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Drop the environments that no results file is of, and the tests that no results file
    /// of their environment has.
    #[arg(long)]
    prune: bool,
    /// Write nothing; exit 1 when the baseline would change.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
struct MergeArgs {
    /// Results files of one environment: a suite's shards, or parts run apart.
    #[arg(required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    #[arg(short, long)]
    output: PathBuf,
    /// When a test is in two inputs: fail (default) or keep the last.
    #[arg(long, value_parser = ["error", "last"], default_value = "error")]
    prefer: String,
}

#[derive(Debug, Args)]
struct ReportArgs {
    results: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Write the report here instead of to stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// html: mark regressions and improvements against this baseline.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// html: show the memory timeline of this `memgauge run` file.
    #[arg(long, value_name = "RUN_FILE")]
    run: Option<PathBuf>,
}

/// Every key of `[tool.memgauge]`, the plugin's and the gate's, defined once for both.
const OPTIONS_TOML: &str = include_str!("../pytest_plugin/memgauge/options.toml");

/// `options.toml`, parsed once.
fn options() -> &'static toml::Table {
    static OPTIONS: std::sync::LazyLock<toml::Table> =
        std::sync::LazyLock::new(|| OPTIONS_TOML.parse().expect("options.toml is TOML"));
    &OPTIONS
}

/// The keys `options.toml` defines.
fn option_keys() -> Vec<&'static str> {
    options().keys().map(String::as_str).collect()
}

/// The option `options.toml` gives `key` as its default.
fn option_default(key: &str) -> Option<&'static toml::Value> {
    options().get(key)?.get("default")
}

/// The known key nearest to `key` (edit distance at most a third of its length), for a hint.
fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut previous = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let substitution = previous + usize::from(ca != *cb);
                previous = row[j + 1];
                row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
            }
        }
        row[b.len()]
    };
    known
        .iter()
        .map(|candidate| (distance(key, candidate), *candidate))
        .filter(|(d, _)| *d <= key.chars().count().max(3) / 3)
        .min()
        .map(|(_, candidate)| candidate)
}

/// `[tool.memgauge]` of pyproject.toml: defaults shared with the pytest plugin.
#[derive(Debug, Default)]
struct Settings {
    output: Option<PathBuf>,
    baseline: Option<PathBuf>,
    tolerance: Option<String>,
    floor: Option<String>,
    gate: Option<String>,
}

impl Settings {
    fn load(explicit: Option<&Path>) -> Result<Settings> {
        let path = explicit.map_or_else(|| PathBuf::from("pyproject.toml"), Path::to_owned);
        let text = match read_text(&path, "") {
            Ok(text) => text,
            // Without --config, no pyproject.toml just means no settings.
            Err(Error::Missing { .. }) if explicit.is_none() => return Ok(Settings::default()),
            Err(error) => return Err(error),
        };
        let document: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Toml {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let Some(table) = document.get("tool").and_then(|t| t.get("memgauge")) else {
            return Ok(Settings::default());
        };
        let table = table
            .as_table()
            .ok_or_else(|| Error::invalid(&path, "key tool.memgauge: must be a table"))?;
        let known = option_keys();
        if let Some(key) = table.keys().find(|key| !known.contains(&key.as_str())) {
            let hint = match nearest(key, &known) {
                Some(near) => format!("did you mean {near}?"),
                None => format!("the keys are {}", known.join(", ")),
            };
            return Err(Error::invalid(
                &path,
                format!("key tool.memgauge.{key}: unknown; {hint}"),
            ));
        }
        // Paths in the file are relative to its directory, as the plugin reads them from the
        // rootdir (where pytest finds pyproject.toml).
        let base = path.parent().unwrap_or(Path::new("")).to_owned();
        let located = |value: Option<String>| value.map(|p| base.join(p));
        let text = |key: &str| -> Result<Option<String>> {
            match table.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(toml::Value::Integer(i)) => Ok(Some(i.to_string())),
                Some(toml::Value::Array(items)) if key == "gate" => Ok(Some(
                    items
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                )),
                Some(_) => Err(Error::invalid(
                    &path,
                    format!("key tool.memgauge.{key}: must be a string"),
                )),
            }
        };
        Ok(Settings {
            output: located(text("output")?),
            baseline: located(text("baseline")?),
            tolerance: text("tolerance")?,
            floor: text("floor")?,
            gate: text("gate")?,
        })
    }

    fn results_path(&self, given: Option<PathBuf>) -> PathBuf {
        given
            .or_else(|| self.output.clone())
            .unwrap_or_else(|| default_path("output"))
    }

    fn baseline_path(&self, given: Option<PathBuf>) -> PathBuf {
        given
            .or_else(|| self.baseline.clone())
            .unwrap_or_else(|| default_path("baseline"))
    }
}

/// A path option's default, from `options.toml`.
fn default_path(key: &str) -> PathBuf {
    match option_default(key) {
        Some(toml::Value::String(path)) => PathBuf::from(path),
        _ => unreachable!("options.toml gives {key} a path as its default"),
    }
}

fn policy(args: &GateOptions, settings: &Settings, baseline: &Baseline) -> Result<Policy> {
    let mut policy = Policy::default();
    if let Some(tolerance) = baseline.defaults.tolerance {
        policy.tolerance = tolerance;
    }
    if let Some(floor) = baseline.defaults.floor {
        policy.floor = floor;
    }
    let pick = |cli: &Option<String>, configured: &Option<String>, what: &str| {
        cli.as_ref()
            .map(|v| (v.clone(), format!("--{what}")))
            .or_else(|| {
                configured
                    .as_ref()
                    .map(|v| (v.clone(), format!("tool.memgauge.{what}")))
            })
    };
    if let Some((text, origin)) = pick(&args.tolerance, &settings.tolerance, "tolerance") {
        policy.tolerance =
            size::parse_percent(&text).map_err(|e| Error::Usage(format!("{origin}: {e}")))?;
    }
    if let Some((text, origin)) = pick(&args.floor, &settings.floor, "floor") {
        policy.floor =
            size::parse_size(&text).map_err(|e| Error::Usage(format!("{origin}: {e}")))?;
    }
    if let Some((text, origin)) = pick(&args.gate, &settings.gate, "gate") {
        policy.gated = text
            .split(',')
            .filter(|name| !name.trim().is_empty())
            .map(|name| {
                Figure::parse(name).ok_or_else(|| {
                    Error::Usage(format!(
                        "{origin}: unknown figure {name:?}; use peak, leaked, rss, allocations"
                    ))
                })
            })
            .collect::<Result<_>>()?;
    }
    Ok(policy)
}

fn run_report(args: ReportArgs, settings: &Settings) -> Result<ExitStatus> {
    let results_path = settings.results_path(args.results);
    let results = Results::load(&results_path)?;
    if args.format != Format::Html && (args.baseline.is_some() || args.run.is_some()) {
        return Err(Error::Usage(
            "--baseline and --run go with --format html".to_owned(),
        ));
    }
    let text = if args.format == Format::Html {
        let baseline = match &args.baseline {
            Some(path) => Some(Baseline::parse(path, &read_text(path, "")?)?),
            None => None,
        };
        let environment = results.environment_key(&results_path)?;
        let comparison = match &baseline {
            Some(baseline) => {
                let policy = policy(&GateOptions::default(), settings, baseline)?;
                Some(compare::compare(&results, baseline, environment, &policy))
            }
            None => None,
        };
        let run = args.run.as_deref().map(timeline::Run::load).transpose()?;
        let svg = run.as_ref().map(|run| timeline::svg(run, &run.title()));
        let title = format!("memgauge report: {}", results_path.display());
        crate::gate::html::report(&results, comparison.as_ref(), svg.as_deref(), &title)
    } else {
        render::results(&results, args.format)
    };
    match &args.output {
        Some(path) => {
            write_atomically(path, text.as_bytes())?;
            eprintln!("memgauge: wrote {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(ExitStatus::Success)
}

fn run_compare(args: CompareArgs, settings: &Settings) -> Result<ExitStatus> {
    if args.format == Format::Html {
        return Err(Error::Usage(
            "compare has no html format: use `memgauge report RESULTS --format html --baseline PATH`"
                .to_owned(),
        ));
    }
    let paths = if args.results.is_empty() {
        vec![settings.results_path(None)]
    } else {
        args.results.clone()
    };
    let baseline_path = settings.baseline_path(args.baseline.clone());
    // The results and the baseline are parsed side by side (a second core halves the wait on
    // a large suite: 100,000 tests are 36 MB of results and 13 MB of baseline), the baseline
    // reading only the environments the results' heads name.
    let texts = paths
        .iter()
        .map(|path| Results::<GateRecord>::read(path))
        .collect::<Result<Vec<_>>>()?;
    let heads: Vec<Head> = texts.iter().map(|text| Head::read(text)).collect();
    let measured = paths
        .iter()
        .zip(&heads)
        .map(|(path, head)| head.environment_key(path).map(str::to_owned))
        .collect::<Result<BTreeSet<_>>>()?;
    // Each environment's other tracing too, to say so when only that one has figures.
    let wanted: BTreeSet<String> = measured
        .iter()
        .flat_map(|key| [key.clone(), other_tracing(key)])
        .collect();
    let wanted: BTreeSet<&str> = wanted.iter().map(String::as_str).collect();
    let (groups, baseline) = std::thread::scope(|scope| {
        let results = scope.spawn(|| {
            let runs = paths
                .iter()
                .zip(&texts)
                .map(|(path, text)| Ok((path.clone(), Results::<GateRecord>::parse(path, text)?)))
                .collect::<Result<Vec<_>>>()?;
            join_environments(runs, false)
        });
        let baseline = read_text(
            &baseline_path,
            "; create it with `memgauge baseline update` and commit it, or pass --baseline",
        )
        .and_then(|text| Baseline::parse_environments(&baseline_path, &text, Some(&wanted)));
        let results = results.join().expect("the results reader does not panic");
        Ok::<_, Error>((results?, baseline?))
    })?;
    drop(texts);
    for environment in &measured {
        refuse_other_tracing(&baseline_path, &baseline, environment)?;
    }
    let policy = policy(&args.gating, settings, &baseline)?;

    let mut environments = Vec::with_capacity(groups.len());
    for (environment, group) in &groups {
        let comparison = baseline
            .figures_for(environment)
            .map(|_| compare::compare(&group.results, &baseline, environment, &policy));
        environments.push(render::Gated {
            environment: environment.clone(),
            files: group
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            tests: group.results.tests.len() + group.results.benchmarks.len(),
            comparison,
        });
    }
    // A regression's report sets its lines at the peak beside the baseline's.
    for gated in &mut environments {
        let Some(comparison) = gated.comparison.as_mut() else {
            continue;
        };
        let results = &groups[&gated.environment].results;
        let regressed: Vec<String> = comparison.regressed_tests().map(str::to_owned).collect();
        for test in regressed {
            if let Some(record) = results.tests.get(&test).or(results.benchmarks.get(&test)) {
                comparison.add_current_sites(&test, &record.sites(), record.peak_bytes);
            }
        }
    }
    let gated: Vec<_> = policy.gated.iter().map(|f| f.name()).collect();
    let gate = render::Gate {
        baseline: baseline_path.display().to_string(),
        policy: format!(
            "gating {}; tolerance {:.1}%, floor {}",
            gated.join(", "),
            policy.tolerance * 100.0,
            size::format_size(policy.floor),
        ),
        record_command: format!(
            "memgauge baseline update --baseline {}",
            render::printable(&baseline_path.display().to_string())
        ),
        environments,
    };

    print!("{}", render::gate(&gate, args.format));
    if let Some(junit) = &args.junit {
        let comparisons: Vec<_> = gate.comparisons().collect();
        write_atomically_with(junit, |out| render::junit(&comparisons, out))?;
    }
    if let Some(markdown) = &args.markdown {
        write_atomically(markdown, render::markdown(&gate).as_bytes())?;
    }
    if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true") {
        print!("{}", render::github_annotations(&gate));
        if let Some(summary) = std::env::var_os("GITHUB_STEP_SUMMARY") {
            let summary = PathBuf::from(summary);
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&summary)
                .map_err(|source| Error::Write {
                    path: summary.clone(),
                    source,
                })?;
            file.write_all(render::markdown(&gate).as_bytes())
                .map_err(|source| Error::Write {
                    path: summary.clone(),
                    source,
                })?;
        }
    }
    let _ = std::io::stdout().flush();
    let regressions = gate.regressions();
    let unbaselined: Vec<String> = gate.unbaselined().map(|g| g.environment.clone()).collect();
    // What is left is a million small allocations, freed by the exit in a fraction of the time
    // it takes to free them one by one.
    std::mem::forget(gate);
    std::mem::forget(groups);
    std::mem::forget(baseline);
    if args.require_baseline && !unbaselined.is_empty() {
        return Err(Error::invalid(
            &baseline_path,
            format!(
                "no figures for environment {} (--require-baseline): record them with \
                 `memgauge baseline update` from those results, and commit the baseline",
                unbaselined.join(", ")
            ),
        ));
    }
    Ok(if regressions > 0 {
        ExitStatus::Regression
    } else {
        ExitStatus::Success
    })
}

/// Results traced one way (with or without native allocations) and a baseline that has figures
/// only for the other: an error, since either every test would look changed or none would be
/// gated.
fn refuse_other_tracing(path: &Path, baseline: &Baseline, environment: &str) -> Result<()> {
    if baseline.one_environment || baseline.figures_for(environment).is_some() {
        return Ok(());
    }
    let other = other_tracing(environment);
    if baseline.figures_for(&other).is_none() {
        return Ok(());
    }
    let (results_traced, baseline_traced, fix) = if environment.ends_with(NATIVE_SUFFIX) {
        ("with", "without", "run pytest without --memprof-native")
    } else {
        ("without", "with", "run pytest with --memprof-native")
    };
    Err(Error::invalid(
        path,
        format!(
            "the results of environment {environment} were traced {results_traced} native \
             allocations, and the baseline has figures for {other} only, traced \
             {baseline_traced}: one cannot gate the other. Either {fix}, or record figures for \
             {environment} with `memgauge baseline update` and commit them"
        ),
    ))
}

/// The results of one environment, joined from its files.
struct Joined<R> {
    paths: Vec<PathBuf>,
    results: Results<R>,
}

/// Joins results files by environment: the shards of one run (all of them: a missing shard is
/// an error), or parts of a suite run apart. A test in two files of one environment is an error
/// unless `keep_last`: reruns are learned by `baseline update`, not gated together.
fn join_environments<R: Record>(
    runs: Vec<(PathBuf, Results<R>)>,
    keep_last: bool,
) -> Result<BTreeMap<String, Joined<R>>> {
    let mut groups: BTreeMap<String, Joined<R>> = BTreeMap::new();
    let mut shards: BTreeMap<String, Vec<ShardOf>> = BTreeMap::new();
    for (path, results) in runs {
        let environment = results.environment_key(&path)?.to_owned();
        shards
            .entry(environment.clone())
            .or_default()
            .push((path.clone(), results.shard(&path)?));
        let Some(group) = groups.get_mut(&environment) else {
            groups.insert(
                environment,
                Joined {
                    paths: vec![path],
                    results,
                },
            );
            continue;
        };
        for (section, incoming) in [
            (&mut group.results.tests, results.tests),
            (&mut group.results.benchmarks, results.benchmarks),
        ] {
            for (id, record) in incoming {
                if section.contains_key(&id) && !keep_last {
                    let earlier = group.paths.last().expect("a group has a file");
                    return Err(Error::invalid(
                        &path,
                        format!(
                            "test {:?} is also in {} (both of environment {environment}): \
                             shards of one run hold each test once; to learn reruns, pass them \
                             to `memgauge baseline update`",
                            render::printable(&id),
                            earlier.display()
                        ),
                    ));
                }
                section.insert(id, record);
            }
        }
        group.paths.push(path);
    }
    for (environment, files) in shards {
        check_shards(&environment, &files)?;
    }
    Ok(groups)
}

/// A results file and the shard (K, N) it was, if one.
type ShardOf = (PathBuf, Option<(u32, u32)>);

/// The shards of one environment: each of 1..=N exactly once, all of one N.
fn check_shards(environment: &str, files: &[ShardOf]) -> Result<()> {
    let Some((first_path, Some((_, count)))) = files.iter().find(|(_, shard)| shard.is_some())
    else {
        return Ok(());
    };
    let mut seen = vec![false; *count as usize];
    for (path, shard) in files {
        match shard {
            Some((index, n)) if n == count && !seen[*index as usize - 1] => {
                seen[*index as usize - 1] = true;
            }
            Some((index, n)) if n == count => {
                return Err(Error::invalid(
                    path,
                    format!("shard {index}/{n} of environment {environment} is given twice"),
                ));
            }
            Some((index, n)) => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "shard {index}/{n}, where {} is a shard of {count}: the shards of one \
                         environment come from one split",
                        first_path.display()
                    ),
                ));
            }
            None => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "not a shard, where {} is one (environment {environment}): pass the \
                         shards of one run",
                        first_path.display()
                    ),
                ));
            }
        }
    }
    let missing: Vec<String> = (1..=*count)
        .filter(|k| !seen[*k as usize - 1])
        .map(|k| format!("{k}/{count}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "environment {environment}: shard {} missing: its tests would go unmeasured; pass \
             every shard's results",
            missing.join(", ")
        )));
    }
    Ok(())
}

fn run_update(args: UpdateArgs, settings: &Settings) -> Result<ExitStatus> {
    let paths = if args.results.is_empty() {
        vec![settings.results_path(None)]
    } else {
        args.results
    };
    let path = settings.baseline_path(args.baseline);
    // The results files are parsed on a second thread while this one reads the baseline, and
    // then helps with the rest: each takes the next file until none is left.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take = || {
        let mut loaded = Vec::new();
        loop {
            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(path) = paths.get(index) else {
                return Ok::<_, Error>(loaded);
            };
            loaded.push((index, Results::<GateRecord>::load(path)?));
        }
    };
    let (runs, (old, old_text)) = std::thread::scope(|scope| {
        let helper = scope.spawn(take);
        let baseline = Baseline::load_or_empty(&path);
        let mine = take();
        let theirs = helper.join().expect("the results reader does not panic");
        let mut runs = match (mine, theirs) {
            (Ok(mut mine), Ok(theirs)) => {
                mine.extend(theirs);
                mine
            }
            (Err(error), _) | (_, Err(error)) => return Err(error),
        };
        // In the order given: the first file's environment is the one a schema-1 file becomes.
        runs.sort_by_key(|(index, _)| *index);
        let runs: Vec<_> = runs.into_iter().map(|(_, results)| results).collect();
        Ok::<_, Error>((runs, baseline?))
    })?;
    let environments = paths
        .iter()
        .zip(&runs)
        .map(|(path, results)| results.environment_key(path))
        .collect::<Result<Vec<_>>>()?;
    let runs: Vec<(&str, &Results<GateRecord>)> = environments.into_iter().zip(&runs).collect();
    if old.one_environment {
        println!(
            "memgauge: {} was written for one environment (schema 1): its figures become those \
             of {}, and it is rewritten as schema {}",
            path.display(),
            runs[0].0,
            baseline::SCHEMA
        );
    }
    let new_text = old.into_updated(&runs, args.prune).render();
    let old_text = old_text.unwrap_or_default();
    if old_text == new_text {
        println!("memgauge: {} is up to date", path.display());
        return Ok(ExitStatus::Success);
    }
    print!("{}", baseline::diff(&path, &old_text, &new_text));
    if args.check {
        println!(
            "memgauge: {} is out of date: run `memgauge baseline update`",
            path.display()
        );
        return Ok(ExitStatus::Regression);
    }
    write_atomically(&path, new_text.as_bytes())?;
    println!("memgauge: wrote {}", path.display());
    Ok(ExitStatus::Success)
}

fn run_merge(args: MergeArgs) -> Result<ExitStatus> {
    let runs = args
        .inputs
        .iter()
        .map(|path| Ok((path.clone(), Results::load(path)?)))
        .collect::<Result<Vec<_>>>()?;
    let groups = join_environments(runs, args.prefer == "last")?;
    if groups.len() > 1 {
        let names: Vec<&str> = groups.keys().map(String::as_str).collect();
        return Err(Error::Usage(format!(
            "the inputs are of {} environments ({}): merge joins one environment's shards; \
             `memgauge compare` takes every environment's results and gates each against its \
             own figures",
            groups.len(),
            names.join(", ")
        )));
    }
    let mut merged = groups
        .into_values()
        .next()
        .expect("clap requires one input")
        .results;
    // The joined file is the whole run, not a shard of it.
    merged.shard = None;
    merged.save(&args.output)?;
    println!(
        "memgauge: wrote {} ({} tests)",
        args.output.display(),
        merged.tests.len()
    );
    Ok(ExitStatus::Success)
}

fn dispatch(cli: Cli) -> Result<ExitStatus> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Compare(args) => run_compare(args, &settings),
        Command::Baseline(BaselineCommand::Update(args)) => run_update(args, &settings),
        Command::Merge(args) => run_merge(args),
        Command::Report(args) => run_report(args, &settings),
        Command::Run(args) => {
            let output = args.output.unwrap_or_else(|| {
                Path::new(timeline::RUNS_DIR).join(timeline::default_run_name())
            });
            let code = timeline::record(&timeline::RunOptions {
                command: args.command,
                interval: args.interval,
                include_children: args.include_children,
                output: output.clone(),
            })?;
            eprintln!("memgauge: samples in {}", output.display());
            Ok(ExitStatus::Command(code))
        }
        Command::Plot(args) => run_plot(args),
        Command::Peak(args) => {
            let files = if args.files.is_empty() {
                vec![latest_run()?]
            } else {
                args.files
            };
            for file in files {
                println!("{}", describe_peak(&file, &timeline::Run::load(&file)?));
            }
            Ok(ExitStatus::Success)
        }
        Command::List => {
            for (index, file) in recorded_runs().iter().enumerate() {
                let run = timeline::Run::load(file)?;
                println!(
                    "{index}\t{}\t{}",
                    describe_peak(file, &run),
                    run.command.join(" ")
                );
            }
            Ok(ExitStatus::Success)
        }
        Command::Clean => {
            let runs = recorded_runs();
            for file in &runs {
                std::fs::remove_file(file).map_err(|source| Error::Write {
                    path: file.clone(),
                    source,
                })?;
                let _ = std::fs::remove_file(file.with_extension("svg"));
            }
            println!("memgauge: removed {} recorded runs", runs.len());
            Ok(ExitStatus::Success)
        }
    }
}

pub fn run<I, T>(args: I) -> ExitStatus
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitStatus::Error
            } else {
                ExitStatus::Success
            };
        }
    };
    match dispatch(cli) {
        Ok(status) => status,
        Err(error) => {
            let _ = std::io::stdout().flush();
            eprintln!("memgauge: error: {error}");
            ExitStatus::Error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_file_defines_the_keys_and_the_gates_defaults() {
        let table: toml::Table = OPTIONS_TOML.parse().unwrap();
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut listed = option_keys();
        listed.sort_unstable();
        let mut parsed = keys.clone();
        parsed.sort_unstable();
        assert_eq!(listed, parsed);
        // The gate's built-in policy is the one the file documents.
        let policy = Policy::default();
        let text = |key: &str| option_default(key).unwrap();
        assert_eq!(
            size::parse_percent(text("tolerance").as_str().unwrap()).unwrap(),
            policy.tolerance
        );
        assert_eq!(
            size::parse_size(text("floor").as_str().unwrap()).unwrap(),
            policy.floor
        );
        let gated: Vec<&str> = policy.gated.iter().map(|f| f.name()).collect();
        let gate = text("gate");
        let documented: Vec<&str> = gate
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(gated, documented);
        for table in table.values() {
            let read_by = table["read_by"].as_array().unwrap();
            assert!(read_by
                .iter()
                .all(|r| matches!(r.as_str(), Some("pytest" | "gate"))));
        }
    }

    #[test]
    fn the_nearest_key_is_suggested() {
        let known = option_keys();
        assert_eq!(nearest("tolerence", &known), Some("tolerance"));
        assert_eq!(nearest("baseline_", &known), Some("baseline"));
        assert_eq!(nearest("zzzzzzzz", &known), None);
    }
}
