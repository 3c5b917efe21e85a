"""Bearer-token authentication as a server interceptor (health checks stay open)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import grpc

from gradfleet.proto.errors import Unauthenticated
from gradfleet.server.translate import status_of

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status_of(Unauthenticated(message)))

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method but health checks.

    The comparison is constant-time (`hmac.compare_digest`).
    """

    def __init__(self, token: str, on_reject: Callable[[], None] | None = None) -> None:
        if not token:
            raise ValueError("the auth token must not be empty.")
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(presented, self._expected):
            return handler
        if self._on_reject is not None:
            self._on_reject()
        reason = "is missing" if not presented else "is wrong"
        log.debug("rejected %s: token %s", method, reason)
        return _abort_handler(
            handler,
            f"the bearer token {reason}; send 'authorization: Bearer <token>' metadata.",
        )
