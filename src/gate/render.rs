//! Turning a comparison or a results file into text, Markdown, JSON, JUnit XML and GitHub
//! Actions annotations.

use std::fmt::Write as _;

use crate::gate::compare::{Change, Comparison, SiteRow, Status};
use crate::model::results::Results;
use crate::model::size::{format_signed_size, format_size, push_number};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Markdown,
    Json,
    /// A self-contained page (`memgauge report` only).
    Html,
}

/// A test id or path for a line of text output: control characters escaped (`\n` as `\\n`),
/// so that a crafted id cannot start a line of its own, which GitHub Actions would read as a
/// workflow command. Borrowed when there is nothing to escape, as nearly always.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn amount(change: &Change, value: i128) -> String {
    if change.figure == "allocations" {
        value.to_string()
    } else {
        format_signed_size(value)
    }
}

fn describe(change: &Change) -> String {
    let percent = change
        .change_percent
        .map_or("new".to_owned(), |p| format!("{p:+.1}%"));
    let sign = if change.change > 0 { "+" } else { "" };
    format!(
        "{} {} -> {} ({sign}{}, {percent})",
        change.figure,
        amount(change, change.baseline.into()),
        amount(change, change.current.into()),
        amount(change, change.change.into()),
    )
}

fn summary_line(comparison: &Comparison) -> String {
    let noisy = match comparison.noisy.len() {
        0 => String::new(),
        n => format!(" ({n} noisy: within their learned spread)"),
    };
    format!(
        "{} regressions, {} improvements, {} new, {} missing, {} unchanged{noisy}",
        comparison.regressions.len(),
        comparison.improvements.len(),
        comparison.new_tests.len(),
        comparison.missing_tests.len(),
        comparison.unchanged,
    )
}

/// `noisy: spread 1.00 MiB`: why a change beyond the tolerance is not gated.
fn spread_note(change: &Change) -> String {
    format!(
        "noisy: spread {}",
        amount(change, change.spread.unwrap_or(0).into())
    )
}

/// What one `memgauge compare` gated: an environment's results against its figures, or an
/// environment the baseline has none for.
pub struct Gated<'a> {
    pub environment: String,
    /// The results files it was read from (shards joined), for the report.
    pub files: Vec<String>,
    pub tests: usize,
    /// `None`: the baseline has no figures for this environment, and nothing was gated.
    pub comparison: Option<Comparison<'a>>,
}

/// The whole gate: every environment, under one header line.
pub struct Gate<'a> {
    pub baseline: String,
    /// `gating peak, leaked; tolerance 10.0%, floor 64.0 KiB`.
    pub policy: String,
    /// The command that records a missing environment's figures.
    pub record_command: String,
    pub environments: Vec<Gated<'a>>,
}

impl Gate<'_> {
    pub fn regressions(&self) -> usize {
        self.comparisons().map(|c| c.regressions.len()).sum()
    }

    pub fn comparisons(&self) -> impl Iterator<Item = &Comparison<'_>> {
        self.environments
            .iter()
            .filter_map(|gated| gated.comparison.as_ref())
    }

    pub fn unbaselined(&self) -> impl Iterator<Item = &Gated<'_>> {
        self.environments
            .iter()
            .filter(|gated| gated.comparison.is_none())
    }

    fn header(&self, gated: &Gated) -> String {
        format!(
            "memgauge: {} tests of {} in {} against {} ({})",
            gated.tests,
            printable(&gated.environment),
            printable(&gated.files.join(", ")),
            printable(&self.baseline),
            self.policy,
        )
    }

    fn no_baseline(&self, gated: &Gated) -> String {
        format!(
            "the baseline has no figures for environment {}: nothing was gated. Record them with \
             `{} {}` and commit {}",
            printable(&gated.environment),
            self.record_command,
            printable(&gated.files.join(" ")),
            printable(&self.baseline),
        )
    }
}

pub fn gate(gate: &Gate, format: Format) -> String {
    match format {
        Format::Json => {
            let environments: Vec<serde_json::Value> = gate
                .environments
                .iter()
                .map(|gated| {
                    let mut value = match &gated.comparison {
                        Some(comparison) => {
                            serde_json::to_value(comparison).expect("comparison serializes")
                        }
                        None => serde_json::json!({"environment": gated.environment}),
                    };
                    value["baseline"] = gated.comparison.is_some().into();
                    value["files"] = gated.files.clone().into();
                    value
                })
                .collect();
            let document = serde_json::json!({
                "regressions": gate.regressions(),
                "environments": environments,
            });
            let mut text = serde_json::to_string_pretty(&document).expect("report serializes");
            text.push('\n');
            text
        }
        // The page needs the results too: `memgauge report --format html --baseline`.
        Format::Markdown | Format::Html => markdown(gate),
        Format::Text => {
            let mut out = String::new();
            for gated in &gate.environments {
                let _ = writeln!(out, "{}", gate.header(gated));
                match &gated.comparison {
                    Some(comparison) => text(comparison, &mut out),
                    None => {
                        let _ = writeln!(out, "NO BASELINE {}", gate.no_baseline(gated));
                    }
                }
            }
            out
        }
    }
}

fn text(comparison: &Comparison, out: &mut String) {
    let regressions = &comparison.regressions;
    for (index, change) in regressions.iter().enumerate() {
        let test = printable(&change.test);
        let _ = writeln!(out, "REGRESSION  {test}  {}", describe(change));
        let last_of_test = regressions
            .get(index + 1)
            .map_or(true, |next| next.test != change.test);
        if last_of_test {
            for row in comparison.sites.get(&change.test).into_iter().flatten() {
                let _ = writeln!(out, "              {}", site_text(row));
            }
        }
    }
    for change in &comparison.improvements {
        let test = printable(&change.test);
        let _ = writeln!(out, "improved    {test}  {}", describe(change));
    }
    for change in &comparison.noisy {
        let test = printable(&change.test);
        let note = spread_note(change);
        let _ = writeln!(out, "noisy       {test}  {} ({note})", describe(change));
    }
    for test in &comparison.new_tests {
        let test = printable(test);
        let _ = writeln!(out, "new         {test}  (not in the baseline)");
    }
    for test in &comparison.missing_tests {
        let test = printable(test);
        let _ = writeln!(
            out,
            "missing     {test}  (in the baseline, not in the results)"
        );
    }
    for test in &comparison.unmeasured_tests {
        let test = printable(test);
        let _ = writeln!(
            out,
            "unmeasured  {test}  (no figures: crashed or failed early)"
        );
    }
    let _ = writeln!(out, "{}", summary_line(comparison));
}

/// `+2.0 MiB`, `-512 B`: a change in bytes, with its sign.
fn change_text(now: u64, before: u64) -> String {
    let change = i128::from(now) - i128::from(before);
    let sign = if change > 0 { "+" } else { "" };
    format!("{sign}{}", format_signed_size(change))
}

/// `t.py:12 in build: 3.0 MiB (baseline 1.0 MiB, +2.0 MiB)`: a site at the peak.
fn site_text(row: &SiteRow) -> String {
    let place = printable(&format!("{}:{} in {}", row.file, row.line, row.function)).into_owned();
    match (row.current, row.baseline) {
        (Some(now), Some(before)) => format!(
            "{place}: {} (baseline {}, {})",
            format_size(now),
            format_size(before),
            change_text(now, before)
        ),
        (Some(now), None) => format!(
            "{place}: {} (not among the baseline's top lines)",
            format_size(now)
        ),
        (None, Some(before)) => format!(
            "{place}: not among the top lines now (baseline {})",
            format_size(before)
        ),
        (None, None) => place,
    }
}

fn markdown_cell(text: &str) -> String {
    text.replace('|', "\\|")
        .replace('`', "'")
        .replace(['\n', '\r'], " ")
}

/// Tables longer than this are collapsed under their summary.
const MARKDOWN_ROWS_SHOWN: usize = 10;

/// `body` under `summary`, collapsed when it has more than [`MARKDOWN_ROWS_SHOWN`] rows.
fn section(out: &mut String, summary: &str, body: &str, rows: usize) {
    if rows > MARKDOWN_ROWS_SHOWN {
        let _ = write!(
            out,
            "\n<details><summary>{summary}</summary>\n\n{body}\n</details>\n"
        );
    } else {
        let _ = write!(out, "\n**{summary}**\n\n{body}");
    }
}

/// The Markdown report: the job summary, and the pull request comment.
pub fn markdown(gate: &Gate) -> String {
    let mut out = String::from("### memgauge\n");
    let several = gate.environments.len() > 1;
    for gated in &gate.environments {
        if several {
            let _ = write!(out, "\n#### `{}`\n", markdown_cell(&gated.environment));
        }
        let _ = write!(out, "\n{}\n", markdown_cell(&gate.header(gated)));
        match &gated.comparison {
            Some(comparison) => markdown_comparison(comparison, &mut out),
            None => {
                let _ = write!(
                    out,
                    "\n:warning: {}\n",
                    markdown_cell(&gate.no_baseline(gated))
                );
            }
        }
    }
    out
}

fn markdown_comparison(comparison: &Comparison, out: &mut String) {
    let _ = write!(out, "\n**{}**\n", summary_line(comparison));
    let rows: Vec<(&str, &Change)> = comparison
        .regressions
        .iter()
        .map(|c| (":red_circle: regression", c))
        .chain(
            comparison
                .improvements
                .iter()
                .map(|c| (":green_circle: improved", c)),
        )
        .chain(comparison.noisy.iter().map(|c| (":white_circle: noisy", c)))
        .collect();
    if !rows.is_empty() {
        let mut table =
            "| | Test | Figure | Baseline | Current | Change |\n|---|---|---|---|---|---|\n"
                .to_owned();
        for (label, change) in &rows {
            let percent = change
                .change_percent
                .map_or("n/a".to_owned(), |p| format!("{p:+.1}%"));
            let noisy = if change.spread.is_some() && label.ends_with("noisy") {
                format!(", {}", spread_note(change))
            } else {
                String::new()
            };
            let sign = if change.change > 0 { "+" } else { "" };
            let _ = writeln!(
                table,
                "| {label} | `{}` | {} | {} | {} | {sign}{} ({percent}{noisy}) |",
                markdown_cell(&change.test),
                change.figure,
                amount(change, change.baseline.into()),
                amount(change, change.current.into()),
                amount(change, change.change.into()),
            );
        }
        let summary = format!(
            "{} regressed, {} improved, {} noisy",
            comparison.regressions.len(),
            comparison.improvements.len(),
            comparison.noisy.len()
        );
        section(out, &summary, &table, rows.len());
    }
    let grown: Vec<_> = comparison
        .sites
        .iter()
        .filter(|(_, rows)| !rows.is_empty())
        .collect();
    if !grown.is_empty() {
        let mut body = String::new();
        for (test, rows) in &grown {
            let _ = write!(
                body,
                "`{}`\n\n| Line at the peak | Baseline | Now | Change |\n|---|---|---|---|\n",
                markdown_cell(test)
            );
            for row in rows.iter() {
                let show = |v: Option<u64>| v.map_or("–".to_owned(), format_size);
                let change = match (row.current, row.baseline) {
                    (Some(now), Some(before)) => change_text(now, before),
                    (Some(_), None) => "new".to_owned(),
                    (None, Some(_)) => "gone".to_owned(),
                    (None, None) => String::new(),
                };
                let _ = writeln!(
                    body,
                    "| `{}` | {} | {} | {change} |",
                    markdown_cell(&format!("{}:{} {}", row.file, row.line, row.function)),
                    show(row.baseline),
                    show(row.current),
                );
            }
            body.push('\n');
        }
        let lines: usize = grown.iter().map(|(_, rows)| rows.len() + 1).sum();
        section(out, "Lines that grew", &body, lines);
    }
    for (title, tests) in [
        ("New tests", &comparison.new_tests),
        ("Missing tests", &comparison.missing_tests),
    ] {
        if !tests.is_empty() {
            let _ = writeln!(
                out,
                "\n<details><summary>{title}: {}</summary>\n",
                tests.len()
            );
            for test in tests {
                let _ = writeln!(out, "- `{}`", markdown_cell(test));
            }
            out.push_str("\n</details>\n");
        }
    }
}

/// The per-test table of a results file, highest peak first.
pub fn results(results: &Results, format: Format) -> String {
    let mut rows: Vec<_> = results.entries().collect();
    rows.sort_by(|a, b| b.1.peak_bytes.cmp(&a.1.peak_bytes).then(a.0.cmp(b.0)));
    let show = |v: Option<u64>| v.map_or("n/a".to_owned(), format_size);
    match format {
        Format::Html => crate::gate::html::report(results, None, None, "memgauge report"),
        Format::Json => {
            let mut text = serde_json::to_string_pretty(results).expect("results serialize");
            text.push('\n');
            text
        }
        Format::Text => {
            let mut out = format!(
                "{:>12} {:>12} {:>12} {:>10}  test\n",
                "peak", "leaked", "RSS peak", "allocs"
            );
            for (id, r) in rows {
                let allocations = r.allocations.map_or("n/a".to_owned(), |a| a.to_string());
                let id = printable(id);
                let _ = writeln!(
                    out,
                    "{:>12} {:>12} {:>12} {allocations:>10}  {id}",
                    show(r.peak_bytes),
                    show(r.leaked_bytes),
                    show(r.rss_peak_bytes)
                );
            }
            out
        }
        Format::Markdown => {
            let mut out =
                "| Test | Peak | Leaked | RSS peak | Allocations |\n|---|---|---|---|---|\n"
                    .to_owned();
            for (id, r) in rows {
                let allocations = r.allocations.map_or("n/a".to_owned(), |a| a.to_string());
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {} | {} | {allocations} |",
                    markdown_cell(id),
                    show(r.peak_bytes),
                    show(r.leaked_bytes),
                    show(r.rss_peak_bytes)
                );
            }
            out
        }
    }
}

pub(crate) fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    push_xml_escaped(&mut out, text);
    out
}

fn push_xml_escaped(out: &mut String, text: &str) {
    if !text
        .bytes()
        .any(|b| b < 0x20 || matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''))
    {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// JUnit XML: one testcase per compared test; regressions fail, new and missing are skipped;
/// the figures ride along as properties. Streamed to `out` a testcase at a time. (Written here
/// rather than with a crate: the crates at hand cannot put properties on a testcase.)
pub fn junit(comparisons: &[&Comparison], out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let count = |comparison: &Comparison| {
        let count = |status: Status| {
            comparison
                .verdicts
                .iter()
                .filter(|v| v.status == status)
                .count()
        };
        (
            comparison.verdicts.len(),
            count(Status::Regressed),
            count(Status::New) + count(Status::Missing) + count(Status::Unmeasured),
        )
    };
    let counts: Vec<_> = comparisons.iter().map(|c| count(c)).collect();
    let total = |pick: fn(&(usize, usize, usize)) -> usize| counts.iter().map(pick).sum::<usize>();
    writeln!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites name=\"memgauge\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\">",
        total(|c| c.0),
        total(|c| c.1),
        total(|c| c.2),
    )?;
    for (comparison, (tests, failures, skipped)) in comparisons.iter().zip(&counts) {
        let name = if comparisons.len() > 1 {
            xml_escape(&format!("memgauge {}", comparison.environment))
        } else {
            "memgauge".to_owned()
        };
        writeln!(
            out,
            "  <testsuite name=\"{name}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"0\">",
        )?;
        testcases(comparison, out)?;
        out.write_all(b"  </testsuite>\n")?;
    }
    out.write_all(b"</testsuites>\n")
}

fn testcases(comparison: &Comparison, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    // Testcases gather in `case` and go out in chunks past BufWriter's own buffer, so they are
    // copied once.
    let mut case = String::with_capacity(1 << 17);
    for verdict in &comparison.verdicts {
        if case.len() >= 1 << 16 {
            out.write_all(case.as_bytes())?;
            case.clear();
        }
        let (module, name) = verdict.test.rsplit_once("::").unwrap_or(("", verdict.test));
        case.push_str("    <testcase classname=\"");
        for (i, part) in module.split("::").enumerate() {
            if i > 0 {
                case.push('.');
            }
            push_xml_escaped(&mut case, part);
        }
        case.push_str("\" name=\"");
        push_xml_escaped(&mut case, name);
        case.push_str("\" time=\"0\"");
        if let Some(file) = verdict.file {
            case.push_str(" file=\"");
            push_xml_escaped(&mut case, file);
            case.push('"');
        }
        if let Some(line) = verdict.line {
            case.push_str(" line=\"");
            push_number(&mut case, line.into());
            case.push('"');
        }
        case.push_str(">\n      <properties>\n");
        for (figure, baseline, current) in &verdict.figures {
            for (prefix, value) in [("baseline_", baseline), ("current_", current)] {
                if let Some(value) = value {
                    // Pushed piece by piece: 800,000 of these for a 100,000-test suite.
                    case.push_str("        <property name=\"");
                    case.push_str(prefix);
                    case.push_str(figure);
                    case.push_str("\" value=\"");
                    push_number(&mut case, *value);
                    case.push_str("\"/>\n");
                }
            }
        }
        case.push_str("      </properties>\n");
        match verdict.status {
            Status::Regressed => {
                let changes: Vec<_> = comparison.regressions[verdict.regressions.clone()]
                    .iter()
                    .map(describe)
                    .collect();
                let message = xml_escape(&format!("memory regression: {}", changes.join("; ")));
                let _ = writeln!(
                    case,
                    "      <failure type=\"memgauge.regression\" message=\"{message}\">{message}</failure>",
                );
            }
            Status::New => {
                case.push_str("      <skipped message=\"new test: not in the baseline yet\"/>\n")
            }
            Status::Missing => {
                case.push_str(
                    "      <skipped message=\"missing: in the baseline, not in the results\"/>\n",
                );
            }
            Status::Unmeasured => {
                case.push_str("      <skipped message=\"not measured: crashed or failed before measuring\"/>\n");
            }
            Status::Passed => {}
        }
        case.push_str("    </testcase>\n");
    }
    out.write_all(case.as_bytes())
}

fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

/// One `::error` workflow command per regression, at the test's file and line, and a
/// `::warning` for each environment without figures.
pub fn github_annotations(gate: &Gate) -> String {
    let mut out = String::new();
    let several = gate.environments.len() > 1;
    for gated in gate.unbaselined() {
        let _ = writeln!(
            out,
            "::warning title={}::{}",
            escape_property("memgauge: no baseline"),
            escape_data(&gate.no_baseline(gated))
        );
    }
    for comparison in gate.comparisons() {
        annotate(comparison, several, &mut out);
    }
    out
}

fn annotate(comparison: &Comparison, several: bool, out: &mut String) {
    for change in &comparison.regressions {
        let mut properties = vec![format!(
            "title={}",
            escape_property("memgauge: memory regression")
        )];
        if let Some(file) = &change.file {
            properties.insert(0, format!("file={}", escape_property(file)));
            if let Some(line) = change.line {
                properties.insert(1, format!("line={line}"));
            }
        }
        let environment = if several {
            format!(" ({})", comparison.environment)
        } else {
            String::new()
        };
        let message = format!("{}{environment}: {}", change.test, describe(change));
        let _ = writeln!(
            out,
            "::error {}::{}",
            properties.join(","),
            escape_data(&message)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_for_xml_and_workflow_commands() {
        assert_eq!(
            xml_escape("a<\"b\">&'\u{1}"),
            "a&lt;&quot;b&quot;&gt;&amp;&apos;\u{FFFD}"
        );
        assert_eq!(escape_property("a:b,c%\n"), "a%3Ab%2Cc%25%0A");
        assert_eq!(escape_data("x:y\r\n"), "x:y%0D%0A");
    }

    #[test]
    fn text_output_escapes_control_characters() {
        assert_eq!(printable("t.py::a"), "t.py::a");
        assert_eq!(
            printable("t.py::a[\n::error::x\r\t\u{1b}]"),
            "t.py::a[\\n::error::x\\r\\t\\u{1b}]"
        );
    }

    #[test]
    fn numbers_in_decimal() {
        for value in [0, 7, 10, 1_000_000, u64::MAX] {
            let mut out = String::from("=");
            push_number(&mut out, value);
            assert_eq!(out, format!("={value}"));
        }
    }
}
