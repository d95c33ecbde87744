"""The GitHub action's shell step, run locally with the Actions environment files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _platforms import bash_scripts
from memgauge.config import DEFINITIONS, environment_key

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# Every test here runs the action's bash scripts.
pytestmark = bash_scripts()

RUN_SH = Path(__file__).parent.parent / ".github" / "actions" / "memgauge" / "run.sh"
# A test id with quotes, a dollar sign, backticks and unicode must survive every step.
TRICKY = "q\"uo'te $HOME `whoami` ünï"

SUITE = f"""
import os
import pytest

@pytest.mark.parametrize("case", [1], ids=[{TRICKY!r}])
def test_tricky(case):
    data = bytearray(int(os.environ["ALLOC_MIB"]) * 2**20)
    del data
"""


def run_action(
    project: Path, alloc_mib: int, **inputs: str
) -> tuple[subprocess.CompletedProcess, dict, str]:
    output = project / "github_output"
    summary = project / "step_summary.md"
    output.write_text("")
    summary.write_text("")
    env = {
        **os.environ,
        "ALLOC_MIB": str(alloc_mib),
        "GITHUB_ACTIONS": "true",
        "GITHUB_OUTPUT": str(output),
        "GITHUB_STEP_SUMMARY": str(summary),
        "INPUT_PYTEST_ARGS": "-q -p no:cacheprovider tests",
        **inputs,
    }
    result = subprocess.run(
        ["bash", str(RUN_SH)], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return result, outputs, summary.read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("memgauge") is None, reason="needs the installed console script")
def test_action_gates_and_passes_odd_test_ids_through(tmp_path: Path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_tricky.py").write_text(SUITE, encoding="utf-8")
    # Without this pytest escapes non-ASCII in ids; users who set it get unicode ids.
    (tmp_path / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        "disable_test_id_escaping_and_forfeit_all_rights_to_community_support = true\n"
    )

    first, outputs, _ = run_action(tmp_path, 1)
    # No baseline yet: bad input, exit 2, and the message says how to make one.
    assert first.returncode == 2, first.stdout + first.stderr
    assert "memgauge baseline update" in first.stderr
    assert outputs["pytest-status"] == "0"

    update = subprocess.run(
        ["memgauge", "baseline", "update", outputs["results"]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert update.returncode == 0, update.stderr
    baseline = tomllib.loads((tmp_path / "memgauge-baseline.toml").read_text(encoding="utf-8"))
    assert f"tests/test_tricky.py::test_tricky[{TRICKY}]" in baseline["tests"]

    same, outputs, summary = run_action(tmp_path, 1)
    assert same.returncode == 0, same.stdout + same.stderr
    assert outputs["gate-status"] == "0"
    assert "0 regressions" in summary

    grown, outputs, summary = run_action(tmp_path, 4)
    assert grown.returncode == 1, grown.stdout + grown.stderr
    assert outputs["gate-status"] == "1"
    annotation = next(line for line in grown.stdout.splitlines() if line.startswith("::error"))
    assert annotation.startswith("::error file=tests/test_tricky.py,line=5,")
    assert f"tests/test_tricky.py::test_tricky[{TRICKY}]: peak" in annotation
    assert TRICKY.replace("`", "'") in summary
    junit = (tmp_path / outputs["junit"]).read_text(encoding="utf-8")
    assert "$HOME" in junit and "ünï" in junit and "<failure" in junit
    # The line that grew, beside the baseline's: in the log and in the report.
    grown_line = next(line for line in grown.stdout.splitlines() if "in test_tricky:" in line)
    assert grown_line.strip().startswith("tests/test_tricky.py:7 in test_tricky: 4.00 MiB")
    assert "(baseline 1.00 MiB, +3.00 MiB)" in grown_line
    report = (tmp_path / outputs["report"]).read_text(encoding="utf-8")
    assert "Lines that grew" in report and "| `tests/test_tricky.py:7 test_tricky` |" in report


EXAMPLES = Path(__file__).parent.parent / "examples"


def examples_project(tmp_path: Path) -> Path:
    """The example suite and its committed baseline, copied. That baseline has the figures of
    the environment it was made in (cp311-linux-x86_64), and another Python allocates other
    sizes: there the gate would find no baseline for the environment and gate nothing. So the
    copy first learns this environment's figures from a run of its own, as a project adding a
    Python to its matrix does; the runs the tests gate are others, compared against them."""
    project = tmp_path / "examples"
    shutil.copytree(EXAMPLES, project, ignore=shutil.ignore_patterns(".memgauge", "__pycache__"))
    key = environment_key(str(DEFINITIONS["environment"]["default"]))
    baseline = tomllib.loads((project / "memgauge-baseline.toml").read_text())
    if any(key not in environments for environments in baseline["tests"].values()):
        learned = tmp_path / "learned.json"
        measure = ["--memprof", "--memprof-output", str(learned), "-q", "-p", "no:cacheprovider"]
        for command in (
            [sys.executable, "-m", "pytest", *measure],
            ["memgauge", "baseline", "update", str(learned)],
        ):
            done = subprocess.run(command, cwd=project, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
    return project


def gate_json(project: Path, *files: str) -> dict:
    """The gate's verdicts on results files, by test: the figures it compared."""
    out = subprocess.run(
        ["memgauge", "compare", *files, "--format", "json"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert out.returncode in (0, 1), out.stderr
    (report,) = json.loads(out.stdout)["environments"]
    return report


@pytest.mark.skipif(shutil.which("memgauge") is None, reason="needs the installed console script")
def test_two_shards_through_the_action_gate_like_the_whole_suite(tmp_path: Path):
    project = examples_project(tmp_path)
    for index in (1, 2):
        result, outputs, _ = run_action(
            project,
            0,
            INPUT_PYTEST_ARGS="-q -p no:cacheprovider",
            INPUT_SHARD=f"{index}/2",
            INPUT_GATE="false",
            INPUT_OUTPUT_DIR=f"artifacts/memgauge-shard-{index}",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "gate-status" not in outputs
        shard = json.loads((project / outputs["results"]).read_text())
        assert shard["shard"] == f"{index}/2" and shard["tests"]
    # The gate job: both shards' artifacts, joined and gated once.
    gated, outputs, summary = run_action(project, 0, INPUT_RESULTS="artifacts/**/results.json")
    assert gated.returncode == 0, gated.stdout + gated.stderr
    assert outputs["gate-status"] == "0"
    assert "memgauge: 5 tests of " in gated.stdout, gated.stdout
    assert "0 regressions" in summary
    # The unsharded run gates the same tests to the same verdicts, on the same figures.
    whole, outputs, _ = run_action(project, 0, INPUT_PYTEST_ARGS="-q -p no:cacheprovider")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    sharded = gate_json(
        project,
        "artifacts/memgauge-shard-1/results.json",
        "artifacts/memgauge-shard-2/results.json",
    )
    unsharded = gate_json(project, outputs["results"])
    for key in ("regressions", "new_tests", "missing_tests", "unmeasured_tests", "unchanged"):
        assert sharded[key] == unsharded[key], key
    sharded_tests = json.loads(
        subprocess.run(
            [
                "memgauge",
                "merge",
                "artifacts/memgauge-shard-1/results.json",
                "artifacts/memgauge-shard-2/results.json",
                "-o",
                "merged.json",
            ],
            cwd=project,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        and (project / "merged.json").read_text()
    )["tests"]
    whole_tests = json.loads((project / outputs["results"]).read_text())["tests"]
    assert sorted(sharded_tests) == sorted(whole_tests)
    for test, record in whole_tests.items():
        for figure in ("peak_bytes", "leaked_bytes"):
            # Traced figures do not depend on which other tests share the process.
            # (Before 3.11 each shard's first test leaks a few KiB more: see test_determinism.)
            slack = 4096 if sys.version_info >= (3, 11) else 12 * 1024
            assert abs(sharded_tests[test][figure] - record[figure]) <= slack, (test, figure)

    # No files match: exit 2, and the message says what to check.
    missing, outputs, _ = run_action(project, 0, INPUT_RESULTS="nothing/**/results.json")
    assert missing.returncode == 2
    assert "no results files match" in missing.stderr


FAKE_GH = """#!{python}
# A stand-in for the GitHub CLI: records each call, keeps comments in a JSON file.
import json, os, re, sys
state_path = os.environ["FAKE_GH_STATE"]
fresh = {{"calls": [], "comments": {{}}, "head": "abc123"}}
state = json.load(open(state_path)) if os.path.exists(state_path) else fresh
args = sys.argv[1:]
state["calls"].append(args)
def field(name):
    value = args[args.index("-F") + 1]
    assert value.startswith(name + "=@"), value
    return open(value[len(name) + 2:], encoding="utf-8").read()
path = next(a for a in args[1:] if a.startswith("repos/"))
method = args[args.index("--method") + 1] if "--method" in args else "GET"
if method == "GET" and path.endswith("/comments"):
    marker = re.search(r'startswith\\("(.*)"\\)', args[args.index("--jq") + 1]).group(1)
    for number, body in state["comments"].items():
        if body.startswith(marker):
            print(number)
elif method == "GET" and "/pulls/" in path:
    print(state["head"])
elif method == "POST":
    state["comments"][str(100 + len(state["comments"]))] = field("body")
elif method == "PATCH":
    number = path.rsplit("/", 1)[1]
    assert number in state["comments"], number
    state["comments"][number] = field("body")
json.dump(state, open(state_path, "w"))
"""

COMMENT_SH = RUN_SH.with_name("comment.sh")
COMMENT_FROM_RUN_SH = RUN_SH.with_name("comment-from-run.sh")


def fake_gh(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gh = bin_dir / "gh"
    gh.write_text(FAKE_GH.format(python=sys.executable))
    gh.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_GH_STATE": str(tmp_path / "gh_state.json"),
        "GH_TOKEN": "t",
        "MEMGAUGE_REPO": "owner/repo",
    }


def gh_state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "gh_state.json").read_text())


def test_the_pull_request_comment_is_posted_once_and_then_updated(tmp_path: Path):
    env = {**fake_gh(tmp_path), "MEMGAUGE_PR": "7"}
    report = tmp_path / "report.md"
    report.write_text("### memgauge\n\n**1 regressions**\n")
    first = subprocess.run(
        ["bash", str(COMMENT_SH), str(report)], env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert "commented on pull request #7" in first.stdout
    report.write_text("### memgauge\n\n**0 regressions**\n")
    second = subprocess.run(
        ["bash", str(COMMENT_SH), str(report)], env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr
    assert "updated the comment on pull request #7" in second.stdout
    state = gh_state(tmp_path)
    (body,) = state["comments"].values()
    assert body.startswith("<!-- memgauge-comment: memgauge -->\n### memgauge")
    assert "**0 regressions**" in body
    methods = [call[call.index("--method") + 1] for call in state["calls"] if "--method" in call]
    assert methods == ["POST", "PATCH"]
    assert state["calls"][0][:3] == ["api", "--paginate", "repos/owner/repo/issues/7/comments"]

    # Another id is another comment; a report over GitHub's limit is cut, and says so.
    line = "ü" * 99  # two bytes a character: a cut by bytes could split one
    report.write_text((line + "\n") * 700, encoding="utf-8")
    other = subprocess.run(
        ["bash", str(COMMENT_SH), str(report)],
        env={**env, "MEMGAUGE_COMMENT_ID": "nightly"},
        capture_output=True,
        text=True,
    )
    assert other.returncode == 0, other.stderr
    bodies = gh_state(tmp_path)["comments"]
    assert len(bodies) == 2
    long = next(b for b in bodies.values() if "nightly" in b)
    assert len(long) < 65_536 and "cut here" in long
    kept = long.splitlines()[1:-3]
    assert len(kept) > 250 and set(kept) == {line}
    bad = subprocess.run(
        ["bash", str(COMMENT_SH), str(report)],
        env={**env, "MEMGAUGE_PR": "7; echo pwned"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a pull request number" in bad.stderr


@pytest.mark.skipif(shutil.which("memgauge") is None, reason="needs the installed console script")
def test_a_forks_comment_is_made_from_its_artifact_as_untrusted_input(tmp_path: Path):
    env = fake_gh(tmp_path)
    project = examples_project(tmp_path)
    artifact = project / "artifacts" / "memgauge-test-0"
    result, _, _ = run_action(
        project, 0, INPUT_PYTEST_ARGS="-q -p no:cacheprovider", INPUT_OUTPUT_DIR=str(artifact)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # What a fork's run leaves: its results, a crafted report and a crafted number.
    (artifact / "report.md").write_text("<img src=x onerror=alert(1)> @everyone")
    run_env = {
        **env,
        "MEMGAUGE_ARTIFACTS": str(project / "artifacts"),
        "MEMGAUGE_BASELINE": str(project / "memgauge-baseline.toml"),
        "MEMGAUGE_HEAD_SHA": "abc123",
    }

    def post(number: str, head: str = "abc123") -> subprocess.CompletedProcess:
        (artifact / "pr-number").write_text(number)
        return subprocess.run(
            ["bash", str(COMMENT_FROM_RUN_SH)],
            cwd=project,
            env={**run_env, "MEMGAUGE_HEAD_SHA": head},
            capture_output=True,
            text=True,
        )

    crafted = post("7$(touch pwned)")
    assert crafted.returncode == 2 and "not a number" in crafted.stderr
    assert not (project / "pwned").exists()
    stale = post("7", head="def456")
    assert stale.returncode == 2 and "not the measured def456" in stale.stderr
    posted = post("7")
    assert posted.returncode == 0, posted.stderr
    (body,) = gh_state(tmp_path)["comments"].values()
    # The report is memgauge's, made here from the results: not the artifact's report.md.
    assert "onerror" not in body and "@everyone" not in body
    assert "memgauge: 5 tests of " in body and "0 regressions" in body
