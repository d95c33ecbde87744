#!/usr/bin/env bash
# For pull requests from forks, whose token cannot comment: run by a `workflow_run` workflow in
# the base repository (see the README), after the measuring workflow uploaded its artifact.
# Everything in the artifact is untrusted (the fork's code wrote it): nothing in it is run or
# posted as it is. The pull request number must be digits and name a pull request whose head is
# the commit that was measured; the report is made here, by this repository's memgauge from the
# results files against this repository's baseline, which escapes whatever the files hold.
#
# Environment: MEMGAUGE_ARTIFACTS (the downloaded artifacts), MEMGAUGE_BASELINE (the trusted
# baseline), MEMGAUGE_HEAD_SHA (github.event.workflow_run.head_sha), MEMGAUGE_REPO, GH_TOKEN,
# MEMGAUGE_COMMENT_ID.
set -euo pipefail
shopt -s globstar nullglob

artifacts="${MEMGAUGE_ARTIFACTS:?MEMGAUGE_ARTIFACTS must be the downloaded artifacts}"
baseline="${MEMGAUGE_BASELINE:-memgauge-baseline.toml}"
head_sha="${MEMGAUGE_HEAD_SHA:?MEMGAUGE_HEAD_SHA must be the measured commit}"
repo="${MEMGAUGE_REPO:?MEMGAUGE_REPO must be owner/name}"

numbers=("$artifacts"/**/pr-number)
if [ "${#numbers[@]}" -eq 0 ]; then
  echo "memgauge: no pr-number in $artifacts: the run was not a pull request's; nothing to post"
  exit 0
fi
pr="$(head -c 20 "${numbers[0]}" | tr -d '[:space:]')"
if ! [[ "$pr" =~ ^[0-9]{1,10}$ ]]; then
  echo "memgauge: the artifact's pull request number is not a number; nothing posted" >&2
  exit 2
fi
actual="$(gh api "repos/$repo/pulls/$pr" --jq .head.sha)"
if [ "$actual" != "$head_sha" ]; then
  echo "memgauge: pull request #$pr's head is $actual, not the measured $head_sha; nothing posted" >&2
  exit 2
fi

files=("$artifacts"/**/results.json)
if [ "${#files[@]}" -eq 0 ]; then
  echo "memgauge: no results.json in $artifacts; nothing posted" >&2
  exit 2
fi
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
status=0
memgauge compare "${files[@]}" --baseline "$baseline" --markdown "$report" > /dev/null || status=$?
if [ "$status" -ge 2 ]; then
  echo "memgauge: the artifact's results could not be gated (exit $status); nothing posted" >&2
  exit "$status"
fi
MEMGAUGE_PR="$pr" "$(dirname "$0")/comment.sh" "$report"
