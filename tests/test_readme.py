"""Every Python block in the README runs as written, each in a fresh interpreter as a
module a new user would paste it into (imported, so an ``if __name__ == "__main__"``
part that runs a worker for ever is left out), with its /tmp paths moved into the
test's own directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 9


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block-{i + 1}" for i in range(len(BLOCKS))])
def test_a_readme_block_runs_as_written(code: str, tmp_path: Path) -> None:
    code = code.replace("/tmp/polybus-readme", str(tmp_path / "readme"))
    (tmp_path / "readme_block.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "-c", "import readme_block"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{code}\n--- stderr:\n{done.stderr[-3000:]}"
    if "print(" in code:  # it got to its result: a message fetched, a reply, a count
        assert done.stdout.strip(), f"{code}\n--- printed nothing"


def test_every_test_the_readme_names_exists() -> None:
    named = set(re.findall(r"`(test_\w+)`", README.read_text()))
    sources = [*README.parent.glob("tests/*.py"), *README.parent.glob("src/polybus/testing/*.py")]
    defined = {
        name for path in sources for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }
    assert named, "the README names no tests"
    assert named <= defined, f"named in the README but not defined: {sorted(named - defined)}"
