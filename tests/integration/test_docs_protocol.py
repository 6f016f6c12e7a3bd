"""docs/protocol.md against the code: its tables name every client frame type, system event, error code and
close code the node has, and its msgpack client example runs as written and prints what the page says.

(The server frame table is checked against real frames by test_docs_examples.py.)
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from aiohttp.test_utils import TestServer

from hubnode import wsreader
from hubnode.errors import CloseCode, ErrorCode
from hubnode.wire import ClientType, SystemEvent
from tests.conftest import node_config, start_server
from tests.helpers import ROOT, SCALE, doc_block

PAGE = "docs/protocol.md"


def table_after(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table under `heading` in docs/protocol.md."""
    text = (ROOT / PAGE).read_text()
    start = text.index(f"\n{heading}\n")
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))])
    return rows


def test_every_close_code_the_node_sends_is_documented() -> None:
    """The close code table has a row for each CloseCode and each WebSocket-level code, and no other."""
    documented = {int(row[0]) for row in table_after("## Close codes") if row[0].isdigit()}
    sent = {int(code) for code in CloseCode} | {wsreader.PROTOCOL_ERROR, wsreader.INVALID_DATA, wsreader.TOO_BIG}
    assert documented == sent


def test_every_error_code_is_documented() -> None:
    """The error table has exactly the ErrorCode values, each in its first cell."""
    documented = {row[0].strip("`") for row in table_after("## Errors")}
    assert documented == {code.value for code in ErrorCode}


def test_every_client_frame_type_is_documented() -> None:
    """The client frame table has exactly the types the node parses."""
    documented = {row[0].strip("`") for row in table_after("### Client frames")}
    assert documented == {t.value for t in ClientType}


def test_every_system_event_is_documented() -> None:
    """The system_message table names each event the node sends."""
    documented = {re.search(r'"event":"(\w+)"', row[0])[1] for row in table_after("### System messages")}
    assert documented == {e.value for e in SystemEvent}


async def test_the_msgpack_client_runs_as_written(tmp_path: Path) -> None:
    """`msgpack_client.py` against a node: the three lines the page shows, in that order."""
    (tmp_path / "msgpack_client.py").write_text(doc_block(PAGE, "# msgpack_client.py"))
    expected = doc_block(PAGE, "connected bot")
    server: TestServer = await start_server(node_config())
    try:
        url = str(server.make_url("/ws")) + "?user_id=bot"
        proc = await asyncio.create_subprocess_exec(sys.executable, "msgpack_client.py", url, cwd=tmp_path,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30 * SCALE)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await server.close()
    assert proc.returncode == 0, err.decode()
    assert out.decode() == expected
