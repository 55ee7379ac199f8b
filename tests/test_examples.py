"""Every example runs on every backend and keeps its invariant, so none of them rots.

Each runs as a user runs it (``python -m examples.<name> --url URL``), with ``--quick``
sizes, and must end with its ``OK:`` line and exit status 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from polybus.testing.plugin import BackendCase

CHECKOUT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.parent.name for p in (CHECKOUT / "examples").glob("*/__main__.py"))
TIMEOUT_S = 120  # an example's own deadlines end it well before this


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_example_keeps_its_invariant(
    example: str, backend: BackendCase, tmp_path: Path
) -> None:
    if backend.name == "memory":
        pytest.skip("an example's services are processes; memory:// lives in one")
    url = backend.url(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", f"examples.{example}", "--url", url, "--quick"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = f"exit status {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.returncode == 0, output
    assert run.stdout.strip().splitlines()[-1].startswith("OK:"), output


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_example_has_a_readme_with_its_command(example: str) -> None:
    readme = CHECKOUT / "examples" / example / "README.md"
    assert readme.exists(), f"examples/{example} has no README.md"
    assert f"python -m examples.{example}" in readme.read_text()


def test_make_demo_and_the_index_name_every_example() -> None:
    makefile = (CHECKOUT / "Makefile").read_text()
    listed = next(line for line in makefile.splitlines() if line.startswith("EXAMPLES :="))
    assert sorted(listed.split(":=")[1].split()) == EXAMPLES
    index = (CHECKOUT / "examples" / "README.md").read_text()
    assert [e for e in EXAMPLES if f"({e}/)" not in index] == []


def test_an_unreachable_broker_is_one_line_within_seconds() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "examples.order_fanout", "--url", "redis://:pw@127.0.0.1:1/0"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    assert run.stderr.startswith("FAILED: cannot use redis://")
    assert "pw" not in run.stderr
    assert "Traceback" not in run.stderr
