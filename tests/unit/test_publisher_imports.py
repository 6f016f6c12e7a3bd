"""The publisher package stays light: no aiohttp ever, no redis or asyncio for the contract."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT

BLOCK_AIOHTTP = textwrap.dedent("""
    import sys

    class NoAiohttp:
        def find_spec(self, name, path=None, target=None):
            if name == "aiohttp" or name.startswith("aiohttp."):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, NoAiohttp())
""")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_blocker_really_blocks_aiohttp() -> None:
    """The meta-path blocker makes `import aiohttp` fail, so the next test means something."""
    result = run_python(BLOCK_AIOHTTP + "import aiohttp\n")
    assert result.returncode != 0 and "blocked for this test" in result.stderr


def test_publisher_imports_without_aiohttp() -> None:
    """Publisher, AsyncPublisher, RecordingPublisher, inspection and hubctl import with aiohttp absent."""
    result = run_python(BLOCK_AIOHTTP + textwrap.dedent("""
        from publisher import AsyncPublisher, Publisher, RecordingPublisher
        import publisher.inspect, publisher.cli, publisher.testing
        assert "aiohttp" not in sys.modules
        assert publisher.cli.main(["publish", "--all", "--type", "t", "--data", "{bad"]) == 2
        print("ok")
    """))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_contract_modules_import_neither_redis_nor_asyncio() -> None:
    """message/keys/envelope/targets (and the pure query/core/inspect layer) pull in no redis or asyncio."""
    result = run_python(textwrap.dedent("""
        import sys
        import publisher, publisher.message, publisher.keys, publisher.envelope, publisher.targets
        import publisher.names, publisher.query, publisher.core, publisher.inspect
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("redis", "asyncio", "aiohttp"))
        print(",".join(heavy) or "none")
    """))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
