"""Pub/sub brokers: how publications travel between nodes."""

from hubnode.broker.base import Broker, BrokerUnavailable, MessageHandler
from hubnode.broker.memory import MemoryBroker

__all__ = ["Broker", "BrokerUnavailable", "MemoryBroker", "MessageHandler"]
