//! Turning a comparison or a results file into text, Markdown, JSON, JUnit XML and GitHub
//! Actions annotations.

use std::fmt::Write as _;

use crate::compare::{Change, Comparison, Status};
use crate::results::Results;
use crate::size::{format_signed_size, format_size};

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

pub fn comparison(comparison: &Comparison, format: Format, header: &str) -> String {
    match format {
        // The page needs the results too: `memgauge report --format html --baseline`.
        Format::Html => markdown(comparison, header),
        Format::Json => {
            let mut text = serde_json::to_string_pretty(comparison).expect("comparison serializes");
            text.push('\n');
            text
        }
        Format::Text => {
            let mut out = format!("{header}\n");
            for change in &comparison.regressions {
                let test = printable(&change.test);
                let _ = writeln!(out, "REGRESSION  {test}  {}", describe(change));
            }
            for change in &comparison.improvements {
                let test = printable(&change.test);
                let _ = writeln!(out, "improved    {test}  {}", describe(change));
            }
            for change in &comparison.noisy {
                let note = spread_note(change);
                let _ = writeln!(
                    out,
                    "noisy       {}  {} ({note})",
                    change.test,
                    describe(change)
                );
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
            out
        }
        Format::Markdown => markdown(comparison, header),
    }
}

fn markdown_cell(text: &str) -> String {
    text.replace('|', "\\|")
        .replace('`', "'")
        .replace('\n', " ")
}

pub fn markdown(comparison: &Comparison, header: &str) -> String {
    let mut out = format!(
        "### memgauge\n\n{header}\n\n**{}**\n\n",
        summary_line(comparison)
    );
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
        out.push_str(
            "| | Test | Figure | Baseline | Current | Change |\n|---|---|---|---|---|---|\n",
        );
        for (label, change) in rows {
            let percent = change
                .change_percent
                .map_or("n/a".to_owned(), |p| format!("{p:+.1}%"));
            let noisy = if change.spread.is_some() && label.ends_with("noisy") {
                format!(", {}", spread_note(change))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {label} | `{}` | {} | {} | {} | {} ({percent}{noisy}) |",
                markdown_cell(&change.test),
                change.figure,
                amount(change, change.baseline.into()),
                amount(change, change.current.into()),
                amount(change, change.change.into()),
            );
        }
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
    out
}

/// The per-test table of a results file, highest peak first.
pub fn results(results: &Results, format: Format) -> String {
    let mut rows: Vec<_> = results.entries().collect();
    rows.sort_by(|a, b| b.1.peak_bytes.cmp(&a.1.peak_bytes).then(a.0.cmp(b.0)));
    let show = |v: Option<u64>| v.map_or("n/a".to_owned(), format_size);
    match format {
        Format::Html => crate::html::report(results, None, None, "memgauge report"),
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

/// `value` in decimal, without the formatting machinery.
fn push_number(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[start..]).expect("ASCII digits"));
}

/// JUnit XML: one testcase per compared test; regressions fail, new and missing are skipped;
/// the figures ride along as properties. Streamed to `out` a testcase at a time. (Written here
/// rather than with a crate: the crates at hand cannot put properties on a testcase.)
pub fn junit(comparison: &Comparison, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let count = |status: Status| {
        comparison
            .verdicts
            .iter()
            .filter(|v| v.status == status)
            .count()
    };
    let failures = count(Status::Regressed);
    let skipped = count(Status::New) + count(Status::Missing) + count(Status::Unmeasured);
    writeln!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <testsuites name=\"memgauge\" tests=\"{0}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\">\n  \
         <testsuite name=\"memgauge\" tests=\"{0}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"0\">",
        comparison.verdicts.len()
    )?;
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
    case.push_str("  </testsuite>\n</testsuites>\n");
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

/// One `::error` workflow command per regression, at the test's file and line.
pub fn github_annotations(comparison: &Comparison) -> String {
    let mut out = String::new();
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
        let message = format!("{}: {}", change.test, describe(change));
        let _ = writeln!(
            out,
            "::error {}::{}",
            properties.join(","),
            escape_data(&message)
        );
    }
    out
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
