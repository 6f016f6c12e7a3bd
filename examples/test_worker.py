# examples/test_worker.py, next to worker.py: `cd examples && pytest test_worker.py`. No Redis needed.
import worker

from publisher.testing import RecordingPublisher


def test_order_shipped_tells_the_customer(monkeypatch):
    hub = RecordingPublisher()
    monkeypatch.setattr(worker, "hub", hub)

    worker.order_shipped(42, "customer-7")

    [note] = hub.to_user("customer-7")
    assert note.type == "order_shipped" and note.data == {"order": 42}
    assert [m.type for m in hub.to_room("ops")] == ["order_shipped"]
