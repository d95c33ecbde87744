//! `memgauge report --format html`: one self-contained page (no network): the per-test table,
//! sortable by each figure, regressions against a baseline highlighted, and the memory
//! timeline of a `memgauge run` when one is given.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::gate::compare::{Comparison, Status};
use crate::gate::render::xml_escape as escape;
use crate::model::results::{Results, TestRecord};
use crate::model::size::{format_signed_size, format_size};

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.summary { margin: 4px 0 16px; color: #444; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f4f4; cursor: pointer; user-select: none; position: sticky; top: 0; }
th:first-child, td:first-child { text-align: left; font-family: ui-monospace, monospace; }
th.sorted-asc::after { content: " \25B2"; } th.sorted-desc::after { content: " \25BC"; }
tr.regressed { background: #fde2e1; } tr.regressed td.status { color: #b00020; font-weight: 600; }
tr.improved td.status { color: #0a7a32; } tr.missing { color: #888; }
section { margin-top: 28px; } .note { color: #666; font-size: 12px; }
"#;

const SCRIPT: &str = r#"
(function () {
  const table = document.getElementById("tests");
  const body = table.tBodies[0];
  const headers = Array.from(table.tHead.rows[0].cells);
  function sortBy(index, descending) {
    const numeric = headers[index].dataset.type === "num";
    const rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      const x = a.cells[index].dataset.v, y = b.cells[index].dataset.v;
      let order;
      if (numeric) {
        const nx = x === "" ? -Infinity : Number(x), ny = y === "" ? -Infinity : Number(y);
        order = nx - ny;
      } else {
        order = x < y ? -1 : x > y ? 1 : 0;
      }
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
    headers[index].classList.add(descending ? "sorted-desc" : "sorted-asc");
  }
  headers.forEach(function (header, index) {
    header.addEventListener("click", function () {
      sortBy(index, !header.classList.contains("sorted-desc"));
    });
  });
  // #sort=<key>[:asc] sorts on load (links, and the tests).
  const wanted = /sort=([a-z_]+)(:asc)?/.exec(location.hash);
  const key = wanted ? wanted[1] : "peak_bytes";
  const index = headers.findIndex(function (h) { return h.dataset.key === key; });
  if (index >= 0) { sortBy(index, !(wanted && wanted[2])); }
  document.body.dataset.ready = "yes";
  console.log("memgauge report: " + body.rows.length + " rows");
})();
"#;

struct Column {
    key: &'static str,
    title: &'static str,
    value: fn(&TestRecord) -> Option<i128>,
    bytes: bool,
}

const COLUMNS: [Column; 7] = [
    Column {
        key: "peak_bytes",
        title: "Peak",
        value: |r| r.peak_bytes.map(i128::from),
        bytes: true,
    },
    Column {
        key: "leaked_bytes",
        title: "Leaked",
        value: |r| r.leaked_bytes.map(i128::from),
        bytes: true,
    },
    Column {
        key: "allocated_bytes",
        title: "Allocated",
        value: |r| r.allocated_bytes.map(i128::from),
        bytes: true,
    },
    Column {
        key: "allocations",
        title: "Allocations",
        value: |r| r.allocations.map(i128::from),
        bytes: false,
    },
    Column {
        key: "rss_peak_bytes",
        title: "RSS peak",
        value: |r| r.rss_peak_bytes.map(i128::from),
        bytes: true,
    },
    Column {
        key: "rss_delta_bytes",
        title: "RSS Δ",
        value: |r| r.rss_delta_bytes.map(i128::from),
        bytes: true,
    },
    Column {
        key: "duration_ms",
        title: "Duration (ms)",
        value: |r| r.duration_s.map(|s| (s * 1000.0).round() as i128),
        bytes: false,
    },
];

/// The page. `comparison` adds the baseline column; `timeline` is an SVG to show below.
pub fn report(
    results: &Results,
    comparison: Option<&Comparison>,
    timeline: Option<&str>,
    title: &str,
) -> String {
    let statuses: HashMap<&str, Status> = comparison
        .map(|c| c.verdicts.iter().map(|v| (v.test, v.status)).collect())
        .unwrap_or_default();
    let mut changes: HashMap<&str, Vec<String>> = HashMap::new();
    let mut improved: HashMap<&str, Vec<String>> = HashMap::new();
    if let Some(comparison) = comparison {
        for (target, list) in [
            (&mut changes, &comparison.regressions),
            (&mut improved, &comparison.improvements),
        ] {
            for change in list {
                let percent = change
                    .change_percent
                    .map_or("new".to_owned(), |p| format!("{p:+.1}%"));
                target
                    .entry(change.test.as_str())
                    .or_default()
                    .push(format!("{} {percent}", change.figure));
            }
        }
    }

    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title>\
         <style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    let summary = match comparison {
        Some(c) => format!(
            "{} tests · {} regressions, {} improvements, {} new, {} missing against the baseline",
            results.tests.len() + results.benchmarks.len(),
            c.regressions.len(),
            c.improvements.len(),
            c.new_tests.len(),
            c.missing_tests.len()
        ),
        None => format!("{} tests", results.tests.len() + results.benchmarks.len()),
    };
    let _ = writeln!(out, "<p class=\"summary\">{}</p>", escape(&summary));
    out.push_str("<table id=\"tests\"><thead><tr><th data-key=\"test\">Test</th>");
    out.push_str("<th data-key=\"outcome\">Outcome</th>");
    for column in &COLUMNS {
        let _ = write!(
            out,
            "<th data-key=\"{}\" data-type=\"num\">{}</th>",
            column.key, column.title
        );
    }
    out.push_str("<th data-key=\"top_site\">Top line</th>");
    if comparison.is_some() {
        out.push_str("<th data-key=\"status\">vs baseline</th>");
    }
    out.push_str("</tr></thead><tbody>\n");
    for (id, record) in results.entries() {
        let status = statuses.get(id.as_str()).copied();
        let class = match status {
            Some(Status::Regressed) => " class=\"regressed\"",
            _ if improved.contains_key(id.as_str()) => " class=\"improved\"",
            _ => "",
        };
        let _ = write!(
            out,
            "<tr{class}><td data-v=\"{0}\">{0}</td><td data-v=\"{1}\">{1}</td>",
            escape(id),
            escape(&record.outcome)
        );
        for column in &COLUMNS {
            let value = (column.value)(record);
            let shown = match value {
                None => "n/a".to_owned(),
                Some(v) if column.bytes => format_signed_size(v),
                Some(v) => v.to_string(),
            };
            let _ = write!(
                out,
                "<td data-v=\"{}\">{}</td>",
                value.map_or(String::new(), |v| v.to_string()),
                escape(&shown)
            );
        }
        let site = record.top_sites.first().map_or(String::new(), |s| {
            format!(
                "{}:{} {} ({})",
                s.file,
                s.line,
                s.function,
                format_size(s.bytes)
            )
        });
        let _ = write!(out, "<td data-v=\"{0}\">{0}</td>", escape(&site));
        if comparison.is_some() {
            let text = match status {
                Some(Status::Regressed) => {
                    format!(
                        "regressed: {}",
                        changes
                            .get(id.as_str())
                            .map_or(String::new(), |c| c.join(", "))
                    )
                }
                Some(Status::New) => "new".to_owned(),
                Some(Status::Unmeasured) => "not measured".to_owned(),
                _ => match improved.get(id.as_str()) {
                    Some(list) => format!("improved: {}", list.join(", ")),
                    None => "ok".to_owned(),
                },
            };
            let _ = write!(
                out,
                "<td class=\"status\" data-v=\"{0}\">{0}</td>",
                escape(&text)
            );
        }
        out.push_str("</tr>\n");
    }
    for missing in comparison.map_or(&[][..], |c| &c.missing_tests[..]) {
        let _ = write!(
            out,
            "<tr class=\"missing\"><td data-v=\"{0}\">{0}</td><td data-v=\"\">missing</td>",
            escape(missing)
        );
        // The figures and the top line: empty.
        for _ in 0..=COLUMNS.len() {
            out.push_str("<td data-v=\"\"></td>");
        }
        out.push_str(
            "<td class=\"status\" data-v=\"missing\">missing from the results</td></tr>\n",
        );
    }
    out.push_str(
        "</tbody></table>\n<p class=\"note\">Peak, leaked and allocated are traced: \
        exact, what Python and NumPy asked for. RSS is the process's resident memory, native \
        libraries included. Click a column to sort.</p>\n",
    );
    if let Some(svg) = timeline {
        let _ = write!(
            out,
            "<section id=\"timeline\"><h2>Memory over time</h2>\n{svg}</section>\n"
        );
    }
    let _ = write!(out, "<script>{SCRIPT}</script>\n</body></html>\n");
    out
}
