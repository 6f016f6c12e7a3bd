# examples/bot.py: `.venv/bin/python examples/bot.py` with a node on http://127.0.0.1:8080 (`make run`).
# A bot in the room "lobby": it answers "!ping" with "pong" and "!who" with who is in the room.
# HUB_URL (one URL, or several separated by commas) and BOT_ROOM change where it goes.
import asyncio
import os

from hubnode.client import HubClient


async def main() -> None:
    urls = os.environ.get("HUB_URL", "ws://127.0.0.1:8080/ws").split(",")
    room = os.environ.get("BOT_ROOM", "lobby")
    async with HubClient(urls, user_id="bot") as hub:
        await hub.join(room)
        print(f"bot joined {room} on {hub.node}", flush=True)
        async for msg in hub:  # reconnects, re-joins and recovers by itself
            text = msg["data"].get("message") if msg["type"] == "room_message" else None
            if text == "!ping":
                await hub.send_to_room(msg["room"], "pong")
            elif text == "!who":
                users = (await hub.presence(msg["room"]))["users"]
                await hub.send_to_room(msg["room"], "here: " + ", ".join(sorted(users)))


if __name__ == "__main__":
    asyncio.run(main())
