#!/usr/bin/env bash
# Posts a memgauge report as one pull request comment, or updates the one posted before (found
# by a hidden marker), with the GitHub CLI (`gh`, on every hosted runner; it reads GH_TOKEN).
#
# Usage: comment.sh REPORT_FILE
# Environment: GH_TOKEN, MEMGAUGE_REPO (owner/name), MEMGAUGE_PR (the pull request number),
# MEMGAUGE_COMMENT_ID (which comment: one per id; default "memgauge").
set -euo pipefail

report="$1"
repo="${MEMGAUGE_REPO:?MEMGAUGE_REPO must be owner/name}"
pr="${MEMGAUGE_PR:?MEMGAUGE_PR must be the pull request number}"
id="${MEMGAUGE_COMMENT_ID:-memgauge}"
if ! [[ "$pr" =~ ^[0-9]+$ ]]; then
  echo "memgauge: '$pr' is not a pull request number" >&2
  exit 2
fi
if ! [[ "$id" =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "memgauge: comment id '$id' must be letters, digits, '.', '_' or '-'" >&2
  exit 2
fi
if [ ! -s "$report" ]; then
  echo "memgauge: no report at $report: nothing to post" >&2
  exit 2
fi

marker="<!-- memgauge-comment: $id -->"
body="$(mktemp)"
trap 'rm -f "$body"' EXIT
# GitHub refuses a comment over 65,536 characters: a long report is cut at a line's end (never
# inside a character), and says so.
limit=60000
{
  echo "$marker"
  if [ "$(wc -c < "$report")" -gt "$limit" ]; then
    head -c "$limit" "$report" | sed '$d'
    printf '\n\n… cut here: the whole report is in the job summary and the uploaded artifact.\n'
  else
    cat "$report"
  fi
} > "$body"

existing="$(gh api --paginate "repos/$repo/issues/$pr/comments" \
  --jq ".[] | select(.body | startswith(\"$marker\")) | .id")"
existing="${existing%%$'\n'*}"
if [ -n "$existing" ]; then
  gh api --method PATCH "repos/$repo/issues/comments/$existing" -F "body=@$body" --silent
  echo "memgauge: updated the comment on pull request #$pr"
else
  gh api --method POST "repos/$repo/issues/$pr/comments" -F "body=@$body" --silent
  echo "memgauge: commented on pull request #$pr"
fi
