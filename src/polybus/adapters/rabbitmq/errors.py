"""pika's exceptions in the polybus error tree: ``map_error`` and the helpers that read a
broker's reply code and text out of a pika close exception."""

from __future__ import annotations

import re

import pika.exceptions as pex  # type: ignore[import-untyped]
from pika.adapters.utils import connection_workflow  # type: ignore[import-untyped]

from ...errors import (
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
)
from .._support.errors import mapped_errors

_CONNECTION_ERRORS = (
    pex.AMQPConnectionError,
    connection_workflow.AMQPConnectorException,
    pex.ConnectionClosed,
)
_REFUSED = (pex.AuthenticationError, pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError)


def _refused(error: BaseException) -> bool:
    """The broker refused the login or the vhost (pika only guesses from the stage at which
    a connection dropped; a guess without the broker's Connection.Close is a network
    problem)."""
    if isinstance(error, pex.AuthenticationError):
        return True
    return isinstance(error, _REFUSED) and "ConnectionClosedByBroker" in str(error.args)


_INEQUIVALENT = re.compile(
    r"inequivalent arg '([^']+)' for (\w+) '([^']*)' in vhost '[^']*': (.*)$"
)


def _reply(exc: BaseException) -> tuple[int, str]:
    """(reply code, reply text) of a pika close exception; (0, str(exc)) if it has none."""
    args = exc.args
    if len(args) >= 2 and isinstance(args[0], int):
        return args[0], str(args[1])
    return 0, str(exc)


def _describe(exc: BaseException | None) -> str:
    """repr() of a client exception, even one whose own repr fails."""
    try:
        return repr(exc)
    except Exception:
        return f"{type(exc).__name__}{exc.args!r}" if exc is not None else "None"


def map_error(exc: BaseException) -> PolybusError:
    """Translate a pika exception into the polybus tree (never raises).

    Transport problems become ConnectionLost; broker channel errors by reply
    code: 404 TopicNotFound, 406 ConfigurationError naming the difference (or
    MessageTooLarge), 403 ConfigurationError about permissions.
    """
    try:
        return _map_error(exc)
    except Exception as failure:  # a malformed exception must not hide the original
        return PolybusError(f"RabbitMQ error {type(exc).__name__}: {_describe(exc)} ({failure!r})")


def _map_error(exc: BaseException) -> PolybusError:
    if isinstance(exc, PolybusError):
        return exc
    name = type(exc).__name__
    if _refused(exc):
        return ConfigurationError(
            f"RabbitMQ refused the connection ({name}): check the user, password and "
            f"virtual host: {_describe(exc)}"
        )
    if isinstance(exc, pex.ConnectionClosedByBroker):
        code, text = _reply(exc)
        if code in (403, 530):
            return ConfigurationError(f"RabbitMQ refused access ({code}): {text}")
        return ConnectionLost(f"RabbitMQ closed the connection ({code}): {text}")
    if isinstance(exc, pex.ConnectionClosedByClient):
        return ClosedError(f"the RabbitMQ connection was closed: {_reply(exc)[1]}")
    if isinstance(exc, _CONNECTION_ERRORS):
        return ConnectionLost(f"connection to RabbitMQ lost ({name}): {_describe(exc)}")
    if isinstance(exc, pex.ChannelClosedByBroker):
        return _channel_error(*_reply(exc))
    if isinstance(exc, pex.ChannelClosedByClient | pex.ChannelWrongStateError):
        return ClosedError(f"the RabbitMQ channel is closed ({name}): {_describe(exc)}")
    if isinstance(exc, pex.ChannelClosed):
        return _channel_error(*_reply(exc))
    if isinstance(exc, pex.UnroutableError):
        return PolybusError(
            "RabbitMQ returned a message as unroutable: no queue is bound to the topic's "
            f"exchange ({_describe(exc)})"
        )
    if isinstance(exc, pex.NackError):
        return PolybusError(f"RabbitMQ refused to store a message (basic.nack): {_describe(exc)}")
    if isinstance(exc, pex.ShortStringTooLong):
        return ConfigurationError(f"a name or property is longer than 255 bytes: {_describe(exc)}")
    if isinstance(exc, pex.BodyTooLongError):
        return MessageTooLarge(f"a message body exceeds its declared size: {_describe(exc)}")
    if isinstance(exc, pex.MethodNotImplemented):
        return CapabilityError(f"this RabbitMQ server does not implement {_describe(exc)}")
    if isinstance(exc, pex.ConsumerCancelled):
        return PolybusError("RabbitMQ cancelled the consumer (was its queue deleted?)")
    if isinstance(exc, pex.ProtocolSyntaxError | pex.InvalidChannelNumber):
        return ConnectionLost(f"AMQP protocol error ({name}): {_describe(exc)}")
    return PolybusError(f"RabbitMQ client error ({name}): {_describe(exc)}")


def _channel_error(code: int, text: str) -> PolybusError:
    if code == 404:
        return TopicNotFound(f"RabbitMQ: {text}")
    if code == 403:
        return ConfigurationError(f"RabbitMQ refused access ({code}); check permissions: {text}")
    if code == 406:
        if "max size" in text:
            return MessageTooLarge(f"RabbitMQ refused an oversized message: {text}")
        match = _INEQUIVALENT.search(text)
        if match:
            arg, kind, name, difference = match.groups()
            return ConfigurationError(
                f"{kind} {name!r} already exists with a different {arg!r} ({difference}); "
                "declare it the same way everywhere, or delete it first"
            )
        return ConfigurationError(f"RabbitMQ refused the declaration (406): {text}")
    if code == 405:
        return ConfigurationError(f"RabbitMQ: the resource is locked by another connection: {text}")
    return PolybusError(f"RabbitMQ closed the channel ({code}): {text}")


def _declare_error(exc: BaseException, what: str) -> PolybusError:
    error = map_error(exc)
    if isinstance(error, ConfigurationError):
        return ConfigurationError(f"cannot declare the {what}: {error}")
    return error


#: ``with amqp_errors():`` around a call into pika maps what it raises
amqp_errors = mapped_errors(map_error, pex.AMQPError)
