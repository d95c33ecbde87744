"""Options that can come from the command line, ``[tool.memgauge]`` in pyproject.toml, or the
pytest ini file: one definition each, so all three mean the same thing (command line wins)."""

from __future__ import annotations

import difflib
import importlib.metadata
import platform
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class Option:
    name: str  # the key in [tool.memgauge] and, prefixed with "memgauge_", in the ini file
    flag: str
    help: str
    default: Any
    kind: str = "string"  # "string", "bool" or "int"
    choices: tuple[str, ...] | None = None
    negatable: bool = False  # a bool with a --no-... flag too

    @property
    def dest(self) -> str:
        return "memgauge_" + self.name.replace("-", "_")

    @property
    def ini_name(self) -> str:
        return self.dest


def _load_definitions() -> dict[str, dict[str, Any]]:
    with (Path(__file__).with_name("options.toml")).open("rb") as file:
        return tomllib.load(file)


# options.toml defines every key once, for the plugin and the memgauge command alike.
DEFINITIONS = _load_definitions()
OPTIONS = tuple(
    Option(
        name,
        spec["flag"],
        spec["help"],
        spec.get("default"),
        kind=spec.get("kind", "string"),
        choices=tuple(spec["choices"]) if "choices" in spec else None,
        negatable=spec.get("negatable", False),
    )
    for name, spec in DEFINITIONS.items()
    if "pytest" in spec["read_by"]
)


def unknown_keys(table: dict[str, Any]) -> list[str]:
    """One message for each key of ``[tool.memgauge]`` that neither the plugin nor the memgauge
    command knows, naming the nearest known one."""
    messages = []
    for key in table:
        if key in DEFINITIONS:
            continue
        near = difflib.get_close_matches(key, DEFINITIONS, n=1)
        hint = f"did you mean {near[0]}?" if near else "known: " + ", ".join(DEFINITIONS)
        messages.append(f"unknown key {key!r} in [tool.memgauge]: {hint}")
    return messages


def read_pyproject(rootpath: Path) -> dict[str, Any]:
    """The ``[tool.memgauge]`` table of ``rootpath/pyproject.toml``, or {}."""
    path = rootpath / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: invalid TOML: {error}") from error
    table = data.get("tool", {}).get("memgauge", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [tool.memgauge] must be a table")
    return table


def coerce(option: Option, value: Any, origin: str) -> Any:
    """Converts a value from pyproject or the ini file to the option's kind."""
    if value is None:
        return None
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{origin}: {option.name} must be true or false, not {value!r}")
    if option.kind == "int":
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{origin}: {option.name} must be a whole number, not {value!r}"
            ) from None
        if number < 0:
            raise ValueError(f"{origin}: {option.name} must be at least 0, not {value!r}")
        return number
    text = str(value)
    if option.choices and text not in option.choices:
        allowed = ", ".join(option.choices)
        raise ValueError(f"{origin}: {option.name} must be one of {allowed}, not {value!r}")
    return text


def environment_key(template: str, origin: str = "environment") -> str:
    """The environment key a template names, e.g. ``cp311-linux-x86_64``."""
    fields = {
        "python": python_tag(),
        "platform": sys.platform,
        "machine": platform.machine().lower() or "unknown",
    }

    def field(match: re.Match) -> str:
        name = match.group(1)
        if name in fields:
            return fields[name]
        if name.startswith("version:") and name[8:].strip():
            try:
                return importlib.metadata.version(name[8:].strip())
            except importlib.metadata.PackageNotFoundError:
                return "none"
        known = ", ".join("{" + key + "}" for key in [*fields, "version:PKG"])
        raise ValueError(f"{origin}: unknown field {{{name}}} in {template!r}; use {known}")

    key = re.sub(r"\{([^{}]*)\}", field, template)
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", key):
        raise ValueError(
            f"{origin}: {template!r} gives the key {key!r}; a key is one or more ASCII letters, "
            "digits, '.', '_', '+' and '-'"
        )
    return key


def python_tag() -> str:
    """``cp311``, ``cp313t`` (free-threaded), ``pp310``: the implementation and version."""
    name = sys.implementation.name
    short = {"cpython": "cp", "pypy": "pp"}.get(name, name)
    threaded = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
    return f"{short}{sys.version_info[0]}{sys.version_info[1]}{threaded}"


def posix_path(path: str) -> str:
    """A test file's path as results record it: with "/" on every OS, as in test ids."""
    return path.replace("\\", "/") if sys.platform == "win32" else path


def parse_shard(text: str, origin: str = "shard") -> tuple[int, int]:
    """``"2/4"`` as (2, 4)."""
    index, _, count = str(text).strip().partition("/")
    if index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count):
        return int(index), int(count)
    raise ValueError(f"{origin}: {text!r} is not a shard: write K/N with 1 <= K <= N, e.g. 2/4")


def in_shard(nodeid: str, shard: tuple[int, int]) -> bool:
    """Whether a test belongs to the shard: by a hash of its id that every run computes alike."""
    index, count = shard
    return zlib.crc32(nodeid.encode("utf-8", "surrogatepass")) % count == index - 1
