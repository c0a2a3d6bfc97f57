"""Shutting a connection's socket down from anywhere, at once (no httptools needed)."""

from __future__ import annotations

import contextlib
import socket

__all__ = ["shutdown"]


def shutdown(sock: object) -> None:
    """Shut `sock` down both ways now: a blocked read on it returns at once and the peer
    sees the disconnect, without closing the descriptor (it still belongs to whoever
    owns the socket: an event loop's transport, a blocking reader).

    `sock` is a socket or what an asyncio transport gives for one (uvloop's refuses
    `shutdown()`: its descriptor is shut down through a socket object borrowed for the
    call). Errors (already closed, not connected) are ignored.
    """
    try:
        sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        return
    except OSError:
        return
    except (TypeError, AttributeError):
        pass
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        return
    with contextlib.suppress(OSError, ValueError, TypeError):
        borrowed = socket.socket(fileno=fileno())
        try:
            borrowed.shutdown(socket.SHUT_RDWR)
        finally:
            borrowed.detach()
