#!/usr/bin/env bash
# The memgauge action's step: pytest --memprof, then the gate. Kept in a script so it can be
# tested locally with GITHUB_ACTIONS, GITHUB_STEP_SUMMARY and GITHUB_OUTPUT pointing at files.
#
# Inputs (environment): INPUT_PYTEST_ARGS (split on whitespace, never evaluated),
# INPUT_BASELINE, INPUT_TOLERANCE, INPUT_FLOOR, INPUT_RESULTS, INPUT_JUNIT.
set -uo pipefail

results="${INPUT_RESULTS:-.memgauge/results.json}"
junit="${INPUT_JUNIT:-.memgauge/junit.xml}"
read -r -a pytest_args <<< "${INPUT_PYTEST_ARGS:-}"

python -m pytest --memprof --memprof-output "$results" "${pytest_args[@]}"
pytest_status=$?

compare_args=(compare "$results" --junit "$junit")
if [ -n "${INPUT_BASELINE:-}" ]; then compare_args+=(--baseline "$INPUT_BASELINE"); fi
if [ -n "${INPUT_TOLERANCE:-}" ]; then compare_args+=(--tolerance "$INPUT_TOLERANCE"); fi
if [ -n "${INPUT_FLOOR:-}" ]; then compare_args+=(--floor "$INPUT_FLOOR"); fi
memgauge "${compare_args[@]}"
gate_status=$?

if [ -n "${GITHUB_OUTPUT:-}" ]; then
  {
    echo "results=$results"
    echo "junit=$junit"
    echo "pytest-status=$pytest_status"
    echo "gate-status=$gate_status"
  } >> "$GITHUB_OUTPUT"
fi

# A regression or bad input fails the step with the gate's code; otherwise the suite's own.
if [ "$gate_status" -ne 0 ]; then exit "$gate_status"; fi
exit "$pytest_status"
