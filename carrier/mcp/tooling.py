"""What every Carrier tool module shares: turning failures into MCP tool errors.

A tool that fails returns an MCP tool error (``isError: true``) whose text says what went wrong and
what to do: a CarrierError's own message, with known secrets redacted. Anything unexpected is logged
with its traceback on stderr and reported to the client in one line, never as a stack trace.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

from mcp.server.mcpserver.exceptions import ToolError

from carrier.errors import CarrierError
from carrier.log import redact

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


def _translate(name: str, exc: Exception) -> ToolError:
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, CarrierError):
        return ToolError(redact(str(exc)))
    log.error("tool %s failed unexpectedly", name, exc_info=exc)
    return ToolError(f"{name} failed unexpectedly ({type(exc).__name__}); the details are in Carrier's log")


def tool_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a tool function (sync or async) so its failures become MCP tool errors.

    ``functools.wraps`` keeps the signature and docstring, which the MCP SDK reads for the schema.
    """
    name = fn.__name__
    if inspect.iscoroutinefunction(fn):
        async_fn = cast(Callable[..., Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await async_fn(*args, **kwargs)
            except Exception as exc:
                raise _translate(name, exc) from None

        return cast(Callable[P, R], async_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _translate(name, exc) from None

    return wrapper
