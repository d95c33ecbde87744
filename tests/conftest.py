import pytest


@pytest.fixture(autouse=True)
def _inner_sessions_quiet(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's inner sessions load pytest-asyncio too: give them the loop scope this
    session sets in pyproject.toml, so they do not warn that it is unset. (Set after pytester
    starts, which clears PYTEST_ADDOPTS.)"""
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")
        monkeypatch.setenv("PYTEST_ADDOPTS", "-o asyncio_default_fixture_loop_scope=function")
