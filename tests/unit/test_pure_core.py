"""The pure core imports no asyncio, aiohttp or redis (STYLE.md point 1)."""

from __future__ import annotations

import subprocess
import sys

PURE = ["hubnode.config", "hubnode.validate", "hubnode.errors", "hubnode.protocol", "hubnode.routing", "hubnode.policy",
        "publisher.message", "publisher.names", "publisher.keys", "publisher.envelope",
        "publisher.targets", "publisher.topology"]


def test_pure_modules_import_no_io_libraries() -> None:
    """Importing the core in a fresh interpreter loads none of asyncio, aiohttp, redis."""
    code = ("import sys\n"
            f"for m in {PURE!r}: __import__(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'aiohttp', 'redis'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure core imported: {out.stdout}"
