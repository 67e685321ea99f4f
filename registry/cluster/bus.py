"""The bus between the nodes of one registry: its interface, and the choice of a backend by URL.

The contract every backend keeps (the Redis one in :mod:`registry.cluster.redis_bus`):

- **Lifecycle.** A bus is made unconnected by :func:`bus_from_url`. :meth:`Bus.connect` makes
  the first connection and subscribes, or raises
  :class:`~registry.errors.BusUnavailableError` and leaves nothing running;
  :meth:`Bus.close` stops the background tasks and awaits them, and fails whatever still waits
  for an answer. ``async with bus_from_url(...) as bus`` does both.
- **Addressing.** Each node has an id, unique in the cluster. A message goes to one node
  (:meth:`Bus.send`, :meth:`Bus.request`) or to every node (:meth:`Bus.broadcast`); a node
  does not receive its own broadcasts. Every message names its sender.
- **At most once.** Each message has a unique id, and a receiver drops an id it has seen
  (also across a reconnect). A message published while its receiver is disconnected is lost:
  the bus carries notices and questions between live nodes; the durable record is the
  database's.
- **Order.** Events from one sender reach their handler in the order they were sent, one at a
  time (events wait in memory for their turn: keep event handlers quick). Each request is
  handled in a task of its own, so a slow request does not hold up other traffic (and a
  handler may itself make requests).
- **Answers or errors, never a hang.** :meth:`Bus.request` returns the handler's answer, or
  raises :class:`~registry.errors.BusTimeoutError` once its timeout has passed (the receiver
  cancels the handler then too), :class:`RemoteError` if the handler raised or there is none
  for the kind, and :class:`~registry.errors.BusUnavailableError` at once while the bus is
  down, when the node addressed is not listening, or when the connection is lost before the
  answer came.
- **Failure.** When the connection to the bus's server is lost, the bus reconnects in the
  background with capped exponential backoff and subscribes again; :attr:`Bus.healthy` is
  False and :meth:`Bus.fault` says why until it has. A message that is not a bus message, or
  a handler that raises, is logged and dropped; the bus carries on.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, Self

from registry.cluster.message import Message
from registry.errors import InvalidArgumentError, RegistryError

#: A handler for one kind of message; for a request, what it returns (JSON) is the answer.
Handler = Callable[[Message], Awaitable[Any]]

#: Seconds :meth:`Bus.request` waits for an answer unless told otherwise.
DEFAULT_REQUEST_TIMEOUT = 5.0

#: Bus URL scheme -> ``module:Class`` of its backend, imported only when a URL of that scheme
#: is used (a single node needs neither Redis nor redis-py).
BACKENDS: dict[str, str] = {
    "redis": "registry.cluster.redis_bus:RedisBus",
    "rediss": "registry.cluster.redis_bus:RedisBus",
    "unix": "registry.cluster.redis_bus:RedisBus",
}
#: What to install for a backend module's missing dependency.
_INSTALL_HINT = "pip install 'agent-fleet-registry[cluster]'"


class RemoteError(RegistryError):
    """The node asked could not answer: its handler raised, or it has none for the kind.

    ``error_type`` is the name of the exception class the handler raised (``LookupError`` for
    a missing handler) and ``detail`` its message, so a caller can tell a refusal it expects
    from a fault.
    """

    def __init__(self, node_id: str, kind: str, error_type: str, detail: str) -> None:
        super().__init__(f"node '{node_id}' could not answer '{kind}': {error_type}: {detail}")
        self.node_id = node_id
        self.kind = kind
        self.error_type = error_type
        self.detail = detail


class Bus(Protocol):
    """Messages between the nodes of one registry (the module docstring states the contract).

    Payloads and answers are JSON values (dicts, lists, strings, numbers, booleans, None).
    """

    @property
    def node_id(self) -> str:
        """This node's id: the sender of what it sends, the address of what it receives."""
        ...

    @property
    def healthy(self) -> bool:
        """Connected and subscribed: messages to this node reach it."""
        ...

    def fault(self) -> str | None:
        """Why the bus cannot carry messages now (one line, for ``/api/health``), or None."""
        ...

    def on(self, kind: str, handler: Handler) -> None:
        """Have ``handler`` take the messages of ``kind`` (one handler per kind)."""
        ...

    async def connect(self) -> None:
        """Connect and subscribe, or raise :class:`~registry.errors.BusUnavailableError`."""
        ...

    async def close(self) -> None:
        """Stop receiving, await the background tasks, fail waiting requests. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def send(self, node_id: str, kind: str, payload: Any = None) -> None:
        """Publish an event to node ``node_id``; BusUnavailableError if it is not listening."""
        ...

    async def broadcast(self, kind: str, payload: Any = None) -> None:
        """Publish an event to every other node listening."""
        ...

    async def request(
        self,
        node_id: str,
        kind: str,
        payload: Any = None,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,  # noqa: ASYNC109 (sent along: see below)
    ) -> Any:
        """Ask node ``node_id``'s handler for ``kind`` and return its answer.

        ``timeout`` travels with the request: the receiver cancels its handler once the
        requester has given up, so a hung handler does not outlive the question."""
        ...


def bus_from_url(url: str, *, node_id: str, **options: Any) -> Bus:
    """An unconnected bus for ``url``, chosen by its scheme in :data:`BACKENDS`, as node
    ``node_id``; ``options`` go to the backend. :class:`~registry.errors.InvalidArgumentError`
    naming ``bus_url`` for a scheme that is not a bus or a backend whose library is missing."""
    scheme, separator, _ = url.partition("://")
    target = BACKENDS.get(scheme) if separator else None
    if target is None:
        schemes = ", ".join(f"{name}://" for name in BACKENDS)
        raise InvalidArgumentError("bus_url", f"'{url}' is not a bus URL ({schemes})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise
        raise InvalidArgumentError(
            "bus_url", f"a {scheme}:// bus needs the module '{exc.name}': {_INSTALL_HINT}"
        ) from exc
    bus: Bus = getattr(module, class_name)(url, node_id=node_id, **options)
    return bus
