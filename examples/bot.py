# examples/bot.py: `.venv/bin/python examples/bot.py` with a node on http://127.0.0.1:8080 (`make run`).
# A bot in the room "lobby": it answers "!ping" with "pong" and "!who" with who is in the room, to
# plain-text messages and to the demo chat's ({"text": ...}) alike.
# HUB_URL (one URL, or several separated by commas) and BOT_ROOM change where it goes.
import asyncio
import os
from typing import Any

from hubnode.client import HubClient


def text_of(message: Any) -> Any:
    """The text of a room message: a string, or the demo chat's {"text": ..., "node": ...}."""
    return message.get("text") if isinstance(message, dict) else message


async def main() -> None:
    urls = os.environ.get("HUB_URL", "ws://127.0.0.1:8080/ws").split(",")
    room = os.environ.get("BOT_ROOM", "lobby")
    async with HubClient(urls, user_id="bot") as hub:
        await hub.join(room)
        print(f"bot joined {room} on {hub.node}", flush=True)
        async for msg in hub:  # reconnects, re-joins and recovers by itself
            if msg["type"] != "room_message":
                continue
            said = text_of(msg["data"].get("message"))
            if said == "!ping":
                await hub.send_to_room(msg["room"], {"text": "pong"})
            elif said == "!who":
                users = (await hub.presence(msg["room"]))["users"]
                await hub.send_to_room(msg["room"], {"text": "here: " + ", ".join(sorted(users))})


if __name__ == "__main__":
    asyncio.run(main())
