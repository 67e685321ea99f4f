"""What lets several ``registry serve`` processes act as one registry.

The database stays the durable record; :class:`Bus` carries notices and questions between the
live nodes (the contract is in :mod:`registry.cluster.bus`). A single node needs none of it:
importing this package imports no bus backend, and redis-py is imported only when a Redis bus
URL is used (extra ``cluster``).
"""

from registry.cluster.bus import (
    BACKENDS,
    DEFAULT_REQUEST_TIMEOUT,
    Bus,
    Handler,
    RemoteError,
    bus_from_url,
)
from registry.cluster.message import Message

__all__ = [
    "BACKENDS",
    "DEFAULT_REQUEST_TIMEOUT",
    "Bus",
    "Handler",
    "Message",
    "RemoteError",
    "bus_from_url",
]
