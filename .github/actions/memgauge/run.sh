#!/usr/bin/env bash
# The memgauge action's step, kept in a script so it can be tested locally with GITHUB_ACTIONS,
# GITHUB_STEP_SUMMARY and GITHUB_OUTPUT pointing at files. Three modes:
#   measure and gate (the default): pytest --memprof, then memgauge compare;
#   measure only (INPUT_GATE=false): pytest --memprof, for a shard or matrix job whose results a
#     later job gates;
#   gate only (INPUT_RESULTS set): memgauge compare of those files (shards are joined, each
#     environment gated against its own figures), for the job after the shards.
#
# Inputs (environment; none is ever evaluated): INPUT_PYTEST_ARGS (split on whitespace),
# INPUT_BASELINE, INPUT_TOLERANCE, INPUT_FLOOR, INPUT_ENVIRONMENT, INPUT_SHARD, INPUT_GATE,
# INPUT_RESULTS (glob patterns, split on whitespace), INPUT_REQUIRE_BASELINE, INPUT_OUTPUT_DIR.
set -uo pipefail
shopt -s globstar nullglob

dir="${INPUT_OUTPUT_DIR:-.memgauge}"
results="$dir/results.json"
junit="$dir/junit.xml"
report="$dir/report.md"
mkdir -p "$dir"

output() {
  if [ -n "${GITHUB_OUTPUT:-}" ]; then echo "$1=$2" >> "$GITHUB_OUTPUT"; fi
}
output results "$results"
output junit "$junit"
output report "$report"

files=()
pytest_status=0
if [ -n "${INPUT_RESULTS:-}" ]; then
  read -r -a patterns <<< "$INPUT_RESULTS"
  for pattern in "${patterns[@]}"; do
    # Each pattern is expanded as a glob, never evaluated.
    matched=($pattern)
    files+=("${matched[@]}")
  done
  if [ "${#files[@]}" -eq 0 ]; then
    echo "memgauge: no results files match '$INPUT_RESULTS': did the measuring jobs upload them, and did this job download them?" >&2
    output gate-status 2
    exit 2
  fi
else
  read -r -a pytest_args <<< "${INPUT_PYTEST_ARGS:-}"
  measure=(--memprof --memprof-output "$results")
  if [ -n "${INPUT_ENVIRONMENT:-}" ]; then measure+=(--memprof-environment "$INPUT_ENVIRONMENT"); fi
  if [ -n "${INPUT_SHARD:-}" ]; then measure+=(--memprof-shard "$INPUT_SHARD"); fi
  python -m pytest "${measure[@]}" "${pytest_args[@]}"
  pytest_status=$?
  output pytest-status "$pytest_status"
  files=("$results")
  if [ "${INPUT_GATE:-true}" = "false" ]; then
    exit "$pytest_status"
  fi
fi

compare_args=(compare "${files[@]}" --junit "$junit" --markdown "$report")
if [ -n "${INPUT_BASELINE:-}" ]; then compare_args+=(--baseline "$INPUT_BASELINE"); fi
if [ -n "${INPUT_TOLERANCE:-}" ]; then compare_args+=(--tolerance "$INPUT_TOLERANCE"); fi
if [ -n "${INPUT_FLOOR:-}" ]; then compare_args+=(--floor "$INPUT_FLOOR"); fi
if [ "${INPUT_REQUIRE_BASELINE:-false}" = "true" ]; then compare_args+=(--require-baseline); fi
memgauge "${compare_args[@]}"
gate_status=$?
output gate-status "$gate_status"

# A regression or bad input fails the step with the gate's code; otherwise the suite's own.
if [ "$gate_status" -ne 0 ]; then exit "$gate_status"; fi
exit "$pytest_status"
