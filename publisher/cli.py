"""`hubctl`: publish to a hub and look inside it from a shell (docs/configuration.md).

    hubctl publish (--all | --room R | --user U) --type T [--data JSON] [--metadata JSON] [--history-size N ...]
    hubctl disconnect (USER | --conn CONN_ID) [--reason R] [--reconnect]
    hubctl join USER ROOM | hubctl leave USER ROOM     # every open connection of USER, server-side
    hubctl history (ROOM | --user U) [--since O] [--limit L]
    hubctl script (publish | read | presence)   # print a shipped Lua script, for publishers in other languages
    hubctl rooms | hubctl members ROOM | hubctl presence ROOM | hubctl nodes | hubctl stats

Everything goes through `Publisher`, so hubctl validates, packs and reads
exactly like a worker would. Output is an aligned table for people, or one
line of JSON with `--json` (the same shapes as the nodes' HTTP API where one
exists). Failures are one line on stderr and a non-zero exit, never a
traceback: 2 for bad input (usage, JSON, message, URL), 1 when Redis cannot
be reached or refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import RedisClusterException
from redis.sentinel import MasterNotFoundError

from publisher.core import DEFAULT_TIMEOUT, default_prefix, default_url
from publisher.core import redact_url as redact
from publisher.history import PUBLISH_SCRIPT, READ_SCRIPT, HistoryPolicy
from publisher.inspect import PRESENCE_SCRIPT, NodeInfo
from publisher.keys import check_prefix
from publisher.sync import Publisher
from publisher.usage import OneLineParser

__all__ = ["main"]

Output = tuple[Any, list[str]]
"""What a command returns: the JSON value and the human lines."""


class UsageError(Exception):
    """Bad input found by hubctl itself (exit 2)."""


# -- commands -----------------------------------------------------------------

def cmd_publish(pub: Publisher, args: argparse.Namespace) -> Output:
    msg: dict[str, Any] = {"type": args.type, "data": _json_arg("--data", args.data)}
    if args.metadata is not None:
        msg["metadata"] = _json_arg("--metadata", args.metadata)
    if args.room is not None:
        channel, count = pub.keys.room_channel(args.room), pub.broadcast_to_room(args.room, msg)
    elif args.user is not None:
        channel, count = pub.keys.user_channel(args.user), pub.broadcast_to_user(args.user, msg)
    else:
        channel, count = pub.keys.all, pub.broadcast_to_all(msg)
    return {"channel": channel, "nodes": count}, [f"published on {channel}: {_plural(count, 'node')} took it"]


def cmd_disconnect(pub: Publisher, args: argparse.Namespace) -> Output:
    if (args.user is None) == (args.conn is None):
        raise UsageError("give exactly one of USER and --conn CONN_ID")
    if args.user is not None:
        count = pub.disconnect_user(args.user, reason=args.reason, reconnect=args.reconnect)
        return _controlled("disconnect", count, user=args.user)
    count = pub.disconnect_connection(args.conn, reason=args.reason, reconnect=args.reconnect)
    return _controlled("disconnect", count, conn=args.conn)


def cmd_join(pub: Publisher, args: argparse.Namespace) -> Output:
    return _controlled("join", pub.join_user(args.user, args.room), user=args.user, room=args.room)


def cmd_leave(pub: Publisher, args: argparse.Namespace) -> Output:
    return _controlled("leave", pub.leave_user(args.user, args.room), user=args.user, room=args.room)


def _controlled(op: str, nodes: int, *, user: str | None = None, conn: str | None = None,
                room: str | None = None) -> Output:
    """A control command's answer: `{"op", "user" or "conn", "room"?, "nodes"}`, and one line saying so."""
    data: dict[str, Any] = {"op": op, **({"user": user} if user is not None else {"conn": conn})}
    what = f"user {user}" if user is not None else f"connection {conn}"
    if room is not None:
        data["room"] = room
        what += f" {'to' if op == 'join' else 'from'} room {room}"
    data["nodes"] = nodes
    return data, [f"{op} {what}: {_plural(nodes, 'node')} took it"]


def cmd_history(pub: Publisher, args: argparse.Namespace) -> Output:
    if (args.room is None) == (args.user is None):
        raise UsageError("give a ROOM or --user U, not both" if args.room is not None else "give a ROOM or --user U")
    found = pub.history(args.room, user=args.user, since=args.since, limit=args.limit)
    what = f"room {args.room}" if args.room is not None else f"user {args.user}"
    if found.epoch is None:
        return found.to_json(), [f"{what} has no history"]
    head = f"{what}: epoch {found.epoch}, offset {found.offset}, {_plural(len(found.messages), 'message')}"
    rows = [[m["offset"], time.strftime("%H:%M:%S", time.localtime(m["timestamp"])), m["type"],
             m.get("user_id") or "-", _short(m.get("data"))] for m in found.messages]
    return found.to_json(), [head, *table(["OFFSET", "TIME", "TYPE", "FROM", "DATA"], rows)] if rows else [head]


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
    return text if len(text) <= width else text[:width - 1] + "…"


SCRIPTS = {"publish": PUBLISH_SCRIPT, "read": READ_SCRIPT, "presence": PRESENCE_SCRIPT}
"""The shipped Lua scripts `hubctl script NAME` prints."""


def cmd_script(pub: Publisher, args: argparse.Namespace) -> Output:
    """No Redis needed: the text a publisher in another language loads (SCRIPT LOAD, then EVALSHA)."""
    script = SCRIPTS[args.name]
    return {"name": script.name, "sha": script.sha, "text": script.text}, [script.text.rstrip("\n")]


def cmd_rooms(pub: Publisher, args: argparse.Namespace) -> Output:
    rooms = pub.rooms()
    rows = [[room, count] for room, count in rooms.items()]
    return {"rooms": rooms}, table(["ROOM", "MEMBERS"], rows) if rows else ["no rooms"]


def cmd_members(pub: Publisher, args: argparse.Namespace) -> Output:
    members = pub.room_members(args.room)
    rows = [[m.conn_id, m.node, m.user_id or "-"] for m in members]
    data = {"room": args.room, "members": [m._asdict() for m in members]}
    return data, table(["CONN_ID", "NODE", "USER_ID"], rows) if rows else [f"no members in {args.room}"]


def cmd_presence(pub: Publisher, args: argparse.Namespace) -> Output:
    found = pub.presence(args.room)
    rows = [[user, count] for user, count in found.users.items()]
    lines = table(["USER", "CONNECTIONS"], rows) if rows else [f"no users in {args.room}"]
    return found.to_json(), [*lines, f"anonymous: {found.anonymous}"]


def cmd_nodes(pub: Publisher, args: argparse.Namespace) -> Output:
    nodes = pub.nodes()
    rows = [_node_row(n) for n in nodes]
    headers = ["NODE", "CLIENTS", "HEARTBEAT", "EXPIRES_IN", "UPTIME", "ADDRESS", "VERSION"]
    return {"nodes": [n.to_json() for n in nodes]}, table(headers, rows) if rows else ["no live nodes"]


def cmd_stats(pub: Publisher, args: argparse.Namespace) -> Output:
    stats = pub.stats()
    return stats.to_json(), table(None, [["clients", stats.clients], ["rooms", stats.rooms],
                                         ["nodes", stats.nodes]])


# -- formatting -----------------------------------------------------------------

def table(headers: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> list[str]:
    """Columns padded to their widest cell; numeric columns aligned right."""
    cells = [[str(c) for c in row] for row in ([list(headers)] if headers else []) + list(rows)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(cells[0]))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return [line(row) for row in cells]


def _node_row(n: NodeInfo) -> list[Any]:
    age = "-" if n.heartbeat_age is None else f"{n.heartbeat_age:.1f}s ago"
    uptime = "-" if n.started_at is None else _duration(time.time() - n.started_at)
    expires = "-" if n.expires_in is None else f"{n.expires_in:.1f}s"
    return [n.id, n.clients, age, expires, uptime, n.address or "-", n.version or "-"]


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _json_arg(flag: str, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc}") from None


# -- arguments and main ---------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[Publisher, argparse.Namespace], Output], str]] = {
    "publish": (cmd_publish, "publish one message to all, a room or a user"),
    "disconnect": (cmd_disconnect, "close every open connection of a user, or one connection (--conn)"),
    "join": (cmd_join, "join every open connection of a user to a room, server-side"),
    "leave": (cmd_leave, "take every open connection of a user out of a room, server-side"),
    "history": (cmd_history, "a room's or user's stored messages, oldest first"),
    "script": (cmd_script, "print the Lua script that publishes with history (publish), reads it (read) "
                           "or reads a room's presence (presence)"),
    "rooms": (cmd_rooms, "rooms and their member counts"),
    "members": (cmd_members, "the connections in one room"),
    "presence": (cmd_presence, "the users in one room with their connection counts, and anonymous connections"),
    "nodes": (cmd_nodes, "live nodes, their heartbeat and client counts"),
    "stats": (cmd_stats, "clients, rooms and nodes (as GET /api/stats)"),
}


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options accepted before and after the command (`hubctl --json rooms` or `hubctl rooms --json`)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--redis-url", default=default(None),
                        help="Redis URL (env HUB_REDIS_URL, else redis://127.0.0.1:6379/0): redis://, "
                             "rediss:// (TLS), redis+sentinel://H:P[,H:P…]/MASTER, redis+cluster://H:P[,H:P…] or "
                             "unix:///path/to/socket")
    for name, what in (("ca", "the CA that signed the Redis server certificates"),
                       ("cert", "a client certificate for Redis"), ("key", "the key of --redis-cert")):
        parser.add_argument(f"--redis-{name}", default=default(None), metavar="FILE",
                            help=f"PEM file of {what} (env HUB_REDIS_{name.upper()}; rediss:// only)")
    parser.add_argument("--key-prefix", default=default(None),
                        help='key prefix (env HUB_KEY_PREFIX, else "hub:")')
    parser.add_argument("--timeout", type=_seconds, default=default(DEFAULT_TIMEOUT),
                        help="seconds allowed for each Redis command")
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON for scripts")


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not (0 < seconds < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value!r}")
    return seconds


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if number < low or (high is not None and number > high):
            upper = f" to {high}" if high is not None else " or more"
            raise argparse.ArgumentTypeError(f"must be a whole number from {low}{upper}, not {value!r}")
        return number
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hubctl", description="Publish to a hubnode cluster and inspect it.")
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    shared = OneLineParser(add_help=False)
    _global_options(shared, suppress=True)
    sub = {name: commands.add_parser(name, parents=[shared], help=text, description=text)
           for name, (_, text) in COMMANDS.items()}
    where = sub["publish"].add_mutually_exclusive_group(required=True)
    where.add_argument("--all", action="store_true", help="every connection")
    where.add_argument("--room", metavar="R", help="the members of room R")
    where.add_argument("--user", metavar="U", help="every connection of user U")
    sub["publish"].add_argument("--type", required=True, metavar="T", help="message type")
    sub["publish"].add_argument("--data", metavar="JSON", help="message data (JSON; default null)")
    sub["publish"].add_argument("--metadata", metavar="JSON", help="message metadata (a JSON object)")
    sub["publish"].add_argument("--history-size", type=_whole(0), metavar="N",
                                help="keep the last N messages of the room or user stream (env HUB_HISTORY_SIZE; "
                                     "a stream that has history is appended to anyway)")
    sub["publish"].add_argument("--history-ttl", type=_whole(1), metavar="S",
                                help="seconds the history lives after its last publish (env HUB_HISTORY_TTL)")
    sub["publish"].add_argument("--history-rooms", metavar="PATTERNS",
                                help="rooms that keep history: names or prefix*, comma-separated (default *)")
    sub["publish"].add_argument("--history-users", choices=("on", "off"), help="whether user streams keep history")
    sub["history"].add_argument("room", metavar="ROOM", nargs="?")
    sub["history"].add_argument("--user", metavar="U", help="the user's stream instead of a room's")
    sub["history"].add_argument("--since", type=_whole(0), default=0, metavar="O",
                                help="messages with offset above O (default 0: all kept)")
    sub["history"].add_argument("--limit", type=_whole(1, 10_000), default=100, metavar="L",
                                help="at most L messages (default 100)")
    sub["disconnect"].add_argument("user", metavar="USER", nargs="?", help="the user whose connections to close")
    sub["disconnect"].add_argument("--conn", metavar="CONN_ID",
                                   help="close only this connection (<node>:<n>, as its connected frame says)")
    sub["disconnect"].add_argument("--reason", default="", metavar="R", help="the reason the client is shown")
    sub["disconnect"].add_argument("--reconnect", action="store_true",
                                   help="close 4001: the client may reconnect (default 4000: it must not)")
    for name in ("join", "leave"):
        sub[name].add_argument("user", metavar="USER")
        sub[name].add_argument("room", metavar="ROOM")
    sub["script"].add_argument("name", choices=tuple(SCRIPTS))
    sub["members"].add_argument("room", metavar="ROOM")
    sub["presence"].add_argument("room", metavar="ROOM")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run one parsed command; raises on failure (main turns that into one line)."""
    url = args.redis_url or default_url()
    prefix = default_prefix() if args.key_prefix is None else args.key_prefix
    problem = check_prefix(prefix)
    if problem:
        source = "--key-prefix" if args.key_prefix is not None else "HUB_KEY_PREFIX"
        raise UsageError(f"{source} {prefix!r}: {problem}")
    users = getattr(args, "history_users", None)
    try:
        history = HistoryPolicy.resolve(getattr(args, "history_size", None), getattr(args, "history_ttl", None),
                                        getattr(args, "history_rooms", None), None if users is None else users == "on")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        pub = Publisher(url, key_prefix=prefix, origin_id=f"hubctl-{os.getpid()}", timeout=args.timeout,
                        history_size=history.size, history_ttl=history.ttl, history_rooms=",".join(history.rooms),
                        history_users=history.users, redis_ca=args.redis_ca, redis_cert=args.redis_cert,
                        redis_key=args.redis_key)
    except ValueError as exc:
        raise UsageError(f"bad Redis URL {redact(url)!r}: {exc}") from None
    with pub:
        try:
            data, lines = COMMANDS[args.command][0](pub, args)
        except redis.TimeoutError:
            limit = f"{args.timeout:g}s"
            raise redis.TimeoutError(f"Redis at {redact(url)} did not answer within {limit}") from None
        except MasterNotFoundError as exc:  # redis-py's text goes on with the repr of every Sentinel client
            raise redis.ConnectionError(f"cannot reach Redis at {redact(url)}: {str(exc).partition(' : ')[0]}") \
                from None
        except (redis.ConnectionError, RedisClusterException) as exc:  # the latter: no usable cluster
            raise redis.ConnectionError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    print(json.dumps(data, ensure_ascii=False, default=repr) if args.json else "\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hubctl` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, ValueError) as exc:  # MessageError is a ValueError
        return _fail(str(exc), 2)
    except redis.RedisError as exc:
        return _fail(str(exc) or type(exc).__name__, 1)
    except BrokenPipeError:  # `hubctl rooms | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def _fail(message: str, status: int) -> int:
    print(f"hubctl: error: {' '.join(message.split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
