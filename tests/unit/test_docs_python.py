"""docs/python.md's examples run as written, and its excerpts of examples/ are what the files say.

The Hub API example (`# app.py`) is run by tests/integration/test_docs_examples.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, doc_block

PAGE = "docs/python.md"


def test_moderation_example_passes_its_own_tests(tmp_path: Path) -> None:
    """`pytest test_moderation.py` next to moderation.py, both copied from the page, as a user runs them."""
    (tmp_path / "moderation.py").write_text(doc_block(PAGE, "# moderation.py"))
    (tmp_path / "test_moderation.py").write_text(doc_block(PAGE, "# test_moderation.py"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}  # Publisher() reads HUB_REDIS_URL
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_moderation.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout + result.stderr


def test_excerpts_of_the_examples_are_verbatim() -> None:
    """The worker's core and its test, shown on the page, are lines of examples/worker.py and test_worker.py."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / PAGE).read_text(), re.S)
    worker = [b for b in blocks if "def order_shipped" in b]
    test = [b for b in blocks if "def test_order_shipped_tells_the_customer" in b]
    assert len(worker) == 1 and len(test) == 1
    assert worker[0] in (ROOT / "examples/worker.py").read_text()
    assert test[0] in (ROOT / "examples/test_worker.py").read_text()
