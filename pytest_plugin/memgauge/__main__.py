"""The ``memgauge`` command: the same Rust CLI as the standalone binary."""

from __future__ import annotations

import sys

from memgauge._native import cli_main


def main() -> int:
    return cli_main(["memgauge", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
