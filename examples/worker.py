# examples/worker.py: `python examples/worker.py 42 alice`. Only `pip install hubnode` is needed.
# With `make cluster` running, first `export HUB_REDIS_URL=redis://127.0.0.1:6380/0` (it prints that line).
import sys

from publisher import Publisher

# One Publisher per process. It connects on the first publish, so creating it at import
# time is safe under Celery's prefork pool (each child gets its own connection and ids).
hub = Publisher()  # HUB_REDIS_URL, else redis://127.0.0.1:6379/0; HUB_KEY_PREFIX, else "hub:"


def order_shipped(order_id: int, customer_id: str) -> int:
    """Tell every open tab of the customer, and the operators' room."""
    hub.broadcast_to_room("ops", {"type": "order_shipped", "data": {"order": order_id}})
    return hub.broadcast_to_user(customer_id, {
        "type": "order_shipped",
        "data": {"order": order_id},
        "metadata": {"source": "worker"},
    })


if __name__ == "__main__":
    nodes = order_shipped(int(sys.argv[1]), sys.argv[2])
    print(f"{nodes} node(s) took it")
