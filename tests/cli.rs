//! The `memgauge` binary end to end: exit codes, files, JUnit and GitHub output.

use std::path::Path;
use std::process::{Command, Output};

fn memgauge(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_memgauge"));
    command
        .current_dir(dir)
        .args(args)
        .env_remove("GITHUB_ACTIONS");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("memgauge runs")
}

/// `memgauge compare now.json --baseline b.toml` and `extra`.
fn compare(dir: &Path, extra: &[&str]) -> Output {
    let args = [&["compare", "now.json", "--baseline", "b.toml"], extra].concat();
    memgauge(dir, &args, &[])
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const TRICKY: &str = "t.py::test[\\\"q\\\" $HOME `tick` é]";

fn results(peak_a: u64) -> String {
    format!(
        r#"{{"schema": 1, "tool": {{"name": "memgauge"}}, "environment": {{}}, "tests": {{
        "t.py::a": {{"outcome": "passed", "file": "t.py", "line": 3, "peak_bytes": {peak_a}, "leaked_bytes": 0, "allocations": 10}},
        "t.py::small": {{"outcome": "passed", "file": "t.py", "line": 9, "peak_bytes": 2000, "leaked_bytes": 0}},
        "{TRICKY}": {{"outcome": "passed", "file": "t.py", "line": 20, "peak_bytes": 500, "leaked_bytes": 0}}}}}}"#
    )
}

fn setup(peak_a: u64) -> tempfile_dir::Dir {
    let dir = tempfile_dir::Dir::new();
    std::fs::write(dir.path().join("base.json"), results(10_000_000)).unwrap();
    std::fs::write(dir.path().join("now.json"), results(peak_a)).unwrap();
    let out = memgauge(
        dir.path(),
        &["baseline", "update", "base.json", "--baseline", "b.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    dir
}

/// A temporary directory removed on drop (std only, to keep dev-dependencies few).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "memgauge-cli-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn regression_exits_1_with_a_junit_failure_for_that_test_only() {
    let dir = setup(12_000_000);
    let out = compare(dir.path(), &["--junit", "j.xml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out)
        .contains("REGRESSION  t.py::a  peak 9.54 MiB -> 11.44 MiB (+1.91 MiB, +20.0%)"));
    let xml = std::fs::read_to_string(dir.path().join("j.xml")).unwrap();
    assert_eq!(xml.matches("<failure ").count(), 1, "{xml}");
    assert!(xml.contains("name=\"a\" time=\"0\" file=\"t.py\" line=\"3\">"));
    assert!(xml.contains("<property name=\"current_peak_bytes\" value=\"12000000\"/>"));
    assert!(
        xml.contains("name=\"test[&quot;q&quot; $HOME `tick` é]\""),
        "{xml}"
    );
}

#[test]
fn under_tolerance_or_floor_exits_0() {
    // +5%: under the tolerance though over the floor.
    let dir = setup(10_500_000);
    let out = compare(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // +100% of a tiny test is under the floor.
    std::fs::write(
        dir.path().join("now.json"),
        results(10_000_000).replace("2000", "4000"),
    )
    .unwrap();
    let out = compare(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // A floor of 0 makes it one.
    let out = compare(dir.path(), &["--floor", "0"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn new_missing_and_improved_are_reported_in_json() {
    let dir = setup(5_000_000);
    let changed = results(5_000_000).replace("t.py::small", "t.py::brand_new");
    std::fs::write(dir.path().join("now.json"), changed).unwrap();
    let out = compare(dir.path(), &["--format", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["regressions"], 0);
    let report = &report["environments"][0];
    assert_eq!(report["environment"], "unknown");
    assert_eq!(report["baseline"], true);
    assert_eq!(report["new_tests"], serde_json::json!(["t.py::brand_new"]));
    assert_eq!(report["missing_tests"], serde_json::json!(["t.py::small"]));
    assert_eq!(report["improvements"][0]["test"], "t.py::a");
    assert_eq!(report["regressions"], serde_json::json!([]));
}

#[test]
fn bad_input_exits_2_naming_the_file_and_position() {
    let dir = setup(1);
    let cases: [(&str, &str, &str); 4] = [
        (
            "broken.json",
            "{\"schema\": 1,\n\"tests\": {,}}",
            "broken.json:2:",
        ),
        (
            "schema.json",
            "{\"schema\": 9, \"tests\": {}}",
            "key \"schema\": version 9",
        ),
        ("missing.json", "", "missing.json: not found"),
        ("now.json", "", "bad.toml: invalid TOML"),
    ];
    std::fs::write(dir.path().join("bad.toml"), "schema = 1\n[tests\n").unwrap();
    for (file, contents, message) in cases {
        if !contents.is_empty() {
            std::fs::write(dir.path().join(file), contents).unwrap();
        }
        let baseline = if file == "now.json" {
            "bad.toml"
        } else {
            "b.toml"
        };
        let out = memgauge(dir.path(), &["compare", file, "--baseline", baseline], &[]);
        assert_eq!(out.status.code(), Some(2), "{file}");
        assert!(stderr(&out).contains(message), "{file}: {}", stderr(&out));
    }
    let out = compare(dir.path(), &["--tolerance", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--tolerance: \"lots\" is not a percentage"));
    let out = memgauge(dir.path(), &["compare", "--nonsense"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn baseline_update_is_stable_and_never_overwrites_a_malformed_baseline() {
    let dir = setup(1);
    let first = std::fs::read(dir.path().join("b.toml")).unwrap();
    let out = memgauge(
        dir.path(),
        &["baseline", "update", "base.json", "--baseline", "b.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("is up to date"));
    assert_eq!(std::fs::read(dir.path().join("b.toml")).unwrap(), first);

    let out = memgauge(
        dir.path(),
        &[
            "baseline",
            "update",
            "now.json",
            "--baseline",
            "b.toml",
            "--check",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("-peak_bytes = 10000000\n+peak_bytes = 1\n"),
        "{}",
        stdout(&out)
    );
    assert_eq!(std::fs::read(dir.path().join("b.toml")).unwrap(), first);

    std::fs::write(
        dir.path().join("b.toml"),
        "schema = 1\n[tests.\"x\"]\npeak_bytes = \"big\"\n",
    )
    .unwrap();
    let out = memgauge(
        dir.path(),
        &["baseline", "update", "now.json", "--baseline", "b.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("key tests.\"x\".peak_bytes"));
    let kept = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    assert!(kept.contains("\"big\""));
}

#[test]
fn an_interrupted_write_leaves_the_old_baseline() {
    let dir = setup(1);
    let before = std::fs::read(dir.path().join("b.toml")).unwrap();
    // The rename cannot replace a directory: the write fails after the temporary was written.
    std::fs::create_dir(dir.path().join("dir.toml")).unwrap();
    let out = memgauge(
        dir.path(),
        &["baseline", "update", "now.json", "--baseline", "dir.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("dir.toml: cannot"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(std::fs::read(dir.path().join("b.toml")).unwrap(), before);
}

#[test]
fn merge_refuses_duplicates_unless_told() {
    let dir = setup(1);
    let out = memgauge(
        dir.path(),
        &["merge", "base.json", "now.json", "-o", "m.json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("now.json: test \"t.py::a\" is also in base.json"),
        "{}",
        stderr(&out)
    );
    let out = memgauge(
        dir.path(),
        &[
            "merge",
            "base.json",
            "now.json",
            "-o",
            "m.json",
            "--prefer",
            "last",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("m.json")).unwrap()).unwrap();
    assert_eq!(merged["tests"]["t.py::a"]["peak_bytes"], 1);
}

#[test]
fn github_annotations_and_step_summary() {
    let dir = setup(12_000_000);
    let summary = dir.path().join("summary.md");
    let mut command = Command::new(env!("CARGO_BIN_EXE_memgauge"));
    let out = command
        .current_dir(dir.path())
        .args(["compare", "now.json", "--baseline", "b.toml"])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains(
        "::error file=t.py,line=3,title=memgauge%3A memory regression::t.py::a: peak 9.54 MiB -> 11.44 MiB"
    ));
    let markdown = std::fs::read_to_string(summary).unwrap();
    assert!(
        markdown.contains("| :red_circle: regression | `t.py::a` | peak |"),
        "{markdown}"
    );
}

#[test]
fn version_and_help_exit_0() {
    let dir = tempfile_dir::Dir::new();
    let out = memgauge(dir.path(), &["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("memgauge "));
    let out = memgauge(dir.path(), &["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Exit codes: 0 within limits, 1 regression found, 2 bad input"));
}

#[test]
fn a_hand_edited_baseline_gates_like_the_written_one() {
    // Other spacing, an inline table, a trailing comment and a hand-set tolerance: not the
    // layout `baseline update` writes, so the general TOML reader takes it.
    let dir = setup(12_000_000);
    std::fs::write(
        dir.path().join("b.toml"),
        "schema = 1\n[tests]\n\"t.py::a\" = { peak_bytes = 10_000_000, leaked_bytes = 0 }\n\
         [tests.\"t.py::small\"]\npeak_bytes   =   2000 # by hand\ntolerance = '5%'\n",
    )
    .unwrap();
    let out = compare(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("REGRESSION  t.py::a  peak"),
        "{}",
        stdout(&out)
    );
    // The same values in the written layout give the same verdict.
    let rewritten = memgauge(
        dir.path(),
        &["baseline", "update", "base.json", "--baseline", "b2.toml"],
        &[],
    );
    assert_eq!(rewritten.status.code(), Some(0), "{}", stderr(&rewritten));
    let out = memgauge(
        dir.path(),
        &["compare", "now.json", "--baseline", "b2.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn a_crashed_run_is_gated_on_what_it_finished() {
    // The stream a killed pytest leaves: `a` finished (and regressed), `small` was running.
    let dir = setup(1);
    let stream = r#"{"event": "session", "environment": {}}
{"event": "start", "id": "t.py::a"}
{"event": "test", "id": "t.py::a", "outcome": "passed", "file": "t.py", "line": 3, "peak_bytes": 12000000, "leaked_bytes": 0, "top_sites": [{"file": "t.py", "line": 4, "function": "a", "bytes": 12000000}]}
{"event": "start", "id": "t.py::small"}
"#;
    std::fs::write(dir.path().join("now.json.partial"), stream).unwrap();
    let out = memgauge(
        dir.path(),
        &[
            "compare",
            "now.json.partial",
            "--baseline",
            "b.toml",
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let report = &report["environments"][0];
    assert_eq!(report["regressions"][0]["test"], "t.py::a");
    assert_eq!(
        report["unmeasured_tests"],
        serde_json::json!(["t.py::small"])
    );
    assert_eq!(
        report["missing_tests"],
        serde_json::json!(["t.py::test[\"q\" $HOME `tick` é]"])
    );
}

#[test]
fn a_baseline_learned_from_reruns_allows_their_spread_visibly() {
    let dir = tempfile_dir::Dir::new();
    for (name, peak) in [
        ("r1.json", 10_000_000),
        ("r2.json", 11_500_000),
        ("r3.json", 10_400_000),
    ] {
        std::fs::write(dir.path().join(name), results(peak)).unwrap();
    }
    let out = memgauge(
        dir.path(),
        &[
            "baseline",
            "update",
            "r1.json",
            "r2.json",
            "r3.json",
            "--baseline",
            "b.toml",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let baseline = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    assert!(
        baseline.contains("peak_bytes = 10400000\npeak_bytes_spread = 1500000\n"),
        "{baseline}"
    );

    // +1.5 MB (14%): beyond the tolerance and the floor, within the spread: exit 0, said.
    std::fs::write(dir.path().join("now.json"), results(11_900_000)).unwrap();
    let out = compare(dir.path(), &["--format", "text"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("noisy       t.py::a  peak 9.92 MiB -> 11.35 MiB"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("(noisy: spread 1.43 MiB)"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("0 regressions"), "{}", stdout(&out));
    let json = compare(dir.path(), &["--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["environments"][0]["noisy"][0]["spread"], 1_500_000);

    // Beyond the spread: a regression.
    std::fs::write(dir.path().join("now.json"), results(12_000_000)).unwrap();
    assert_eq!(compare(dir.path(), &[]).status.code(), Some(1));
}

/// `results(peak_a)` measured in `environment`, optionally as a shard.
fn of_environment(environment: &str, peak_a: u64, shard: Option<&str>) -> String {
    let shard = shard.map_or(String::new(), |s| format!(r#""shard": "{s}", "#));
    results(peak_a).replace(
        r#""environment": {}"#,
        &format!(r#"{shard}"environment": {{"key": "{environment}", "python": "x"}}"#),
    )
}

#[test]
fn a_matrix_keeps_one_baseline_with_each_environment_gated_against_its_own() {
    let dir = tempfile_dir::Dir::new();
    let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "cp311.json",
        of_environment("cp311-linux-x86_64", 10_000_000, None),
    );
    write(
        "cp312.json",
        of_environment("cp312-linux-x86_64", 20_000_000, None),
    );
    let update = |files: &[&str]| {
        let args = [&["baseline", "update"], files, &["--baseline", "b.toml"]].concat();
        memgauge(dir.path(), &args, &[])
    };
    let out = update(&["cp311.json", "cp312.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    assert!(text.contains("[tests.\"t.py::a\".\"cp311-linux-x86_64\"]\npeak_bytes = 10000000\n"));
    assert!(text.contains("[tests.\"t.py::a\".\"cp312-linux-x86_64\"]\npeak_bytes = 20000000\n"));

    // 3.12 at 3.11's figures is no regression of 3.11's, and an improvement of its own.
    write(
        "now312.json",
        of_environment("cp312-linux-x86_64", 12_000_000, None),
    );
    write(
        "now311.json",
        of_environment("cp311-linux-x86_64", 12_000_000, None),
    );
    let args = [
        "compare",
        "now312.json",
        "--baseline",
        "b.toml",
        "--format",
        "json",
    ];
    let out = memgauge(dir.path(), &args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["environments"][0]["improvements"][0]["test"],
        "t.py::a"
    );
    // Both at once: one report, each against its own; 3.11 regressed.
    let args = [
        "compare",
        "now311.json",
        "now312.json",
        "--baseline",
        "b.toml",
        "--junit",
        "j.xml",
    ];
    let out = memgauge(dir.path(), &args, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("memgauge: 3 tests of cp311-linux-x86_64 in now311.json against b.toml"),
        "{text}"
    );
    assert!(
        text.contains("memgauge: 3 tests of cp312-linux-x86_64 in now312.json"),
        "{text}"
    );
    assert_eq!(text.matches("REGRESSION").count(), 1, "{text}");
    let junit = std::fs::read_to_string(dir.path().join("j.xml")).unwrap();
    assert!(
        junit
            .contains("<testsuite name=\"memgauge cp311-linux-x86_64\" tests=\"3\" failures=\"1\""),
        "{junit}"
    );
    assert!(
        junit
            .contains("<testsuite name=\"memgauge cp312-linux-x86_64\" tests=\"3\" failures=\"0\""),
        "{junit}"
    );

    // Updating 3.12 leaves 3.11's tables byte-identical.
    let before = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    let out = update(&["now312.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let after = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    let tables = |text: &str, environment: &str| -> Vec<String> {
        text.split("\n\n")
            .filter(|table| table.contains(&format!(".\"{environment}\"]")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        tables(&before, "cp311-linux-x86_64"),
        tables(&after, "cp311-linux-x86_64")
    );
    assert_ne!(
        tables(&before, "cp312-linux-x86_64"),
        tables(&after, "cp312-linux-x86_64")
    );
    // --prune drops the environments no results are of.
    let out = memgauge(
        dir.path(),
        &[
            "baseline",
            "update",
            "now312.json",
            "--baseline",
            "b.toml",
            "--prune",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let pruned = std::fs::read_to_string(dir.path().join("b.toml")).unwrap();
    assert!(
        !pruned.contains("cp311") && pruned.contains("cp312"),
        "{pruned}"
    );
}

#[test]
fn an_environment_without_figures_gates_nothing_unless_a_baseline_is_required() {
    let dir = setup(1);
    let summary = dir.path().join("summary.md");
    std::fs::write(
        dir.path().join("b.toml"),
        "schema = 2\n[tests.\"t.py::a\".\"cp311\"]\npeak_bytes = 1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("now.json"),
        of_environment("cp314t-darwin-arm64", 99_000_000, None),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_memgauge"));
    command
        .current_dir(dir.path())
        .args(["compare", "now.json", "--baseline", "b.toml"])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let warning = text
        .lines()
        .find(|l| l.starts_with("::warning"))
        .expect("a warning");
    assert!(
        warning.contains("environment cp314t-darwin-arm64: nothing was gated"),
        "{warning}"
    );
    assert!(
        warning.contains("memgauge baseline update --baseline b.toml now.json"),
        "{warning}"
    );
    assert!(text.contains("NO BASELINE"), "{text}");
    assert!(std::fs::read_to_string(&summary)
        .unwrap()
        .contains(":warning: the baseline has no figures for environment cp314t-darwin-arm64"));
    let out = compare(dir.path(), &["--require-baseline"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "b.toml: no figures for environment cp314t-darwin-arm64 (--require-baseline)"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn shards_are_joined_and_a_missing_one_is_an_error() {
    let dir = tempfile_dir::Dir::new();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    let whole = of_environment("e", 10_000_000, None);
    write("whole.json", &whole);
    let out = memgauge(
        dir.path(),
        &["baseline", "update", "whole.json", "--baseline", "b.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Shard 1 has t.py::a and the tricky test, shard 2 t.py::small.
    let shard = |shard: &str, tests: &str| {
        format!(
            r#"{{"schema": 1, "shard": "{shard}", "environment": {{"key": "e"}}, "tests": {{{tests}}}}}"#
        )
    };
    let one = shard(
        "1/2",
        &format!(
            r#""t.py::a": {{"outcome": "passed", "file": "t.py", "line": 3, "peak_bytes": 12000000, "leaked_bytes": 0, "allocations": 10}},
            "{TRICKY}": {{"outcome": "passed", "file": "t.py", "line": 20, "peak_bytes": 500, "leaked_bytes": 0}}"#
        ),
    );
    let two = shard(
        "2/2",
        r#""t.py::small": {"outcome": "passed", "file": "t.py", "line": 9, "peak_bytes": 2000, "leaked_bytes": 0}"#,
    );
    write("s1.json", &one);
    write("s2.json", &two);
    let out = memgauge(
        dir.path(),
        &[
            "compare",
            "s1.json",
            "s2.json",
            "--baseline",
            "b.toml",
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let report = &report["environments"][0];
    assert_eq!(report["files"], serde_json::json!(["s1.json", "s2.json"]));
    assert_eq!(report["missing_tests"], serde_json::json!([]));
    assert_eq!(report["regressions"][0]["test"], "t.py::a");
    // Merged, the same verdicts.
    let out = memgauge(
        dir.path(),
        &["merge", "s1.json", "s2.json", "-o", "m.json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let merged = memgauge(
        dir.path(),
        &[
            "compare",
            "m.json",
            "--baseline",
            "b.toml",
            "--format",
            "json",
        ],
        &[],
    );
    let merged: serde_json::Value = serde_json::from_slice(&merged.stdout).unwrap();
    assert_eq!(
        merged["environments"][0]["regressions"],
        report["regressions"]
    );
    // One shard alone: exit 2, naming the missing one.
    let out = memgauge(
        dir.path(),
        &["compare", "s1.json", "--baseline", "b.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("environment e: shard 2/2 missing"),
        "{}",
        stderr(&out)
    );
    // Two environments are not one merge.
    write("other.json", &of_environment("f", 1, None));
    let out = memgauge(
        dir.path(),
        &["merge", "whole.json", "other.json", "-o", "m2.json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("the inputs are of 2 environments (e, f)"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("m2.json").exists());
}

#[test]
fn settings_are_checked_and_their_paths_are_the_files_own() {
    let dir = setup(10_000_000);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::rename(dir.path().join("b.toml"), sub.join("b.toml")).unwrap();
    std::fs::rename(dir.path().join("now.json"), sub.join("now.json")).unwrap();
    // Paths in sub/pyproject.toml are relative to sub/, wherever memgauge runs.
    std::fs::write(
        sub.join("pyproject.toml"),
        "[tool.memgauge]\noutput = \"now.json\"\nbaseline = \"b.toml\"\n",
    )
    .unwrap();
    let out = memgauge(
        dir.path(),
        &["--config", "sub/pyproject.toml", "compare"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("0 regressions"), "{}", stdout(&out));
    // A misspelt key is an error naming it and the key meant, not a silent default.
    std::fs::write(
        sub.join("pyproject.toml"),
        "[tool.memgauge]\ntolerence = \"1%\"\n",
    )
    .unwrap();
    let out = memgauge(
        dir.path(),
        &["--config", "sub/pyproject.toml", "compare"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("key tool.memgauge.tolerence: unknown; did you mean tolerance?"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn merge_keeps_the_keys_a_newer_writer_added() {
    let dir = tempfile_dir::Dir::new();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "one.json",
        r#"{"schema": 1, "determinism": {"seed": 0}, "from_the_future": {"x": 1}, "tests": {"t.py::a": {"outcome": "passed", "peak_bytes": 1, "rss_sampled": true, "first_use": {"leaked_bytes": 5}}}}"#,
    );
    write(
        "two.json",
        r#"{"schema": 1, "tests": {"t.py::b": {"outcome": "passed", "peak_bytes": 2, "new_figure": 7}}}"#,
    );
    let out = memgauge(
        dir.path(),
        &["merge", "one.json", "two.json", "-o", "m.json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("m.json")).unwrap()).unwrap();
    assert_eq!(merged["tests"]["t.py::a"]["rss_sampled"], true);
    assert_eq!(merged["tests"]["t.py::a"]["first_use"]["leaked_bytes"], 5);
    assert_eq!(merged["tests"]["t.py::b"]["new_figure"], 7);
    assert_eq!(merged["determinism"]["seed"], 0);
}

#[test]
fn figures_traced_with_native_allocations_are_not_gated_against_figures_without() {
    let dir = tempfile_dir::Dir::new();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "plain.json",
        &of_environment("cp311-linux-x86_64", 10_000_000, None),
    );
    write(
        "native.json",
        &of_environment("cp311-linux-x86_64+native", 30_000_000, None),
    );
    let update = |results: &str| {
        memgauge(
            dir.path(),
            &["baseline", "update", results, "--baseline", "b.toml"],
            &[],
        )
    };
    assert_eq!(update("plain.json").status.code(), Some(0));
    let gate = |results: &str| {
        memgauge(
            dir.path(),
            &["compare", results, "--baseline", "b.toml"],
            &[],
        )
    };
    let out = gate("native.json");
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let message = stderr(&out);
    assert!(message.contains("b.toml"), "{message}");
    assert!(
        message.contains(
            "the results of environment cp311-linux-x86_64+native were traced with native \
             allocations, and the baseline has figures for cp311-linux-x86_64 only"
        ),
        "{message}"
    );
    assert!(
        message.contains("run pytest without --memprof-native"),
        "{message}"
    );
    // Once the baseline has figures of both, each gates against its own.
    assert_eq!(update("native.json").status.code(), Some(0));
    assert_eq!(gate("native.json").status.code(), Some(0));
    assert_eq!(gate("plain.json").status.code(), Some(0));
    // And the other way round: a baseline of native figures only.
    std::fs::remove_file(dir.path().join("b.toml")).unwrap();
    assert_eq!(update("native.json").status.code(), Some(0));
    let out = gate("plain.json");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("run pytest with --memprof-native"),
        "{}",
        stderr(&out)
    );
}
