"""One reader of URL options for every backend, session store and inbox.

>>> options = Options("redis://:pw@host/0?prefix=app&cluster=yes", ours={"prefix", "cluster"})
>>> options.text("prefix", "polybus"), options.flag("cluster", False)
('app', True)

Every error it raises is a ConfigurationError that names the option, says what
it wants, and shows the URL through :func:`~polybus.errors.redact_url`, so a
password or a secret option never reaches a message or a log line.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import TypeVar
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from ...errors import ConfigurationError, redact_url
from .connect import CONNECT_TIMEOUT

__all__ = ["Options", "parse_flag"]

N = TypeVar("N", int, float)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_flag(value: str) -> bool | None:
    """``value`` as a boolean (1/0, true/false, yes/no, on/off), or None if it is none."""
    lowered = value.strip().lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else None


class Options:
    """The query options of ``url``: ``ours`` are read with the typed getters, the ones
    ``passes`` accepts are handed to the client library untouched (:attr:`passed`);
    any other raises ConfigurationError listing what is known.

    The last value of a repeated option wins, as in every client library's parser.
    """

    def __init__(
        self,
        url: str,
        *,
        ours: Collection[str],
        passes: Collection[str] | Callable[[str], bool] = (),
        passes_hint: str = "",
        what: str = "",
    ) -> None:
        self.url = url
        self.what = f"{what} " if what else ""  #: what the URL opens, for messages
        self.shown = redact_url(url)  #: the URL as messages show it
        try:
            self.parts: SplitResult = urlsplit(url)
            if "," not in self.parts.netloc:  # one host: a bad port raises here, not in a client
                self.parts.port  # noqa: B018
        except ValueError as exc:
            raise self.error(_redacted(exc, url)) from None
        accepts = passes if callable(passes) else passes.__contains__
        self._ours: dict[str, str] = {}
        self.passed: list[tuple[str, str]] = []  #: options for the client library, in order
        unknown = []
        for name, value in parse_qsl(self.parts.query, keep_blank_values=True):
            if name in ours:
                self._ours[name] = value
            elif accepts(name):
                self.passed.append((name, value))
            else:
                unknown.append(name)
        if unknown:
            known = ", ".join(sorted(ours) + ([] if callable(passes) else sorted(passes)))
            hint = f"; {passes_hint}" if passes_hint else ""
            names = ", ".join(repr(name) for name in sorted(unknown))
            plural = "s" if len(unknown) > 1 else ""
            raise ConfigurationError(
                f"unknown option{plural} {names} in {self.shown!r}; known: {known}{hint}"
            )

    def error(self, message: str) -> ConfigurationError:
        """A ConfigurationError saying ``message`` about this URL (shown redacted)."""
        return ConfigurationError(f"bad {self.what}URL {self.shown!r}: {message}")

    def given(self, name: str) -> bool:
        return name in self._ours

    def text(self, name: str, default: str, choices: Iterable[str] | None = None) -> str:
        value = self._ours.get(name, default)
        if choices is not None and value not in (allowed := tuple(choices)):
            raise self.error(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        if name not in self._ours:
            return default
        value = parse_flag(self._ours[name])
        if value is None:
            raise self.error(f"{name} must be true or false, not {self._ours[name]!r}")
        return value

    def number(
        self,
        name: str,
        default: N,
        *,
        minimum: N | None = None,
        positive: bool = False,
        unit: str = "",
    ) -> N:
        """The option as ``type(default)`` (int or float), at least ``minimum``, or
        above zero when ``positive``; ``unit`` names what it counts, for messages."""
        if name not in self._ours:
            return default
        raw = self._ours[name]
        kind = type(default)
        wanted = ("a positive " if positive else "an " if kind is int else "a ") + (
            "integer" if kind is int else "number"
        )
        wanted += f" of {unit}" if unit else ""
        try:
            value = kind(raw)
        except ValueError:
            raise self.error(f"{name} must be {wanted}, not {raw!r}") from None
        if (positive and not value > 0) or (minimum is not None and value < minimum):
            least = f" of at least {minimum}" if minimum is not None else ""
            raise self.error(f"{name} must be {wanted}{least}, not {raw!r}")
        return value

    def optional_number(self, name: str, kind: type[N], *, minimum: N | None = None) -> N | None:
        if name not in self._ours:
            return None
        return self.number(name, kind(0), minimum=minimum)

    def seconds(self, name: str, default: float) -> float:
        """A duration in seconds, above zero."""
        return self.number(name, float(default), positive=True, unit="seconds")

    def connect_timeout(self) -> float:
        """The ``connect_timeout`` option: how long a new bus waits for its broker."""
        return self.seconds("connect_timeout", CONNECT_TIMEOUT)

    def addresses(self, default_port: int) -> list[tuple[str, int]]:
        """The ``host:port`` pairs of the URL's comma-separated host list."""
        out = []
        for hostport in self.parts.netloc.rpartition("@")[2].split(","):
            try:
                address = urlsplit(f"//{hostport.strip()}")
                out.append((address.hostname or "localhost", address.port or default_port))
            except ValueError:
                raise self.error(f"bad address {hostport!r}: use host:port") from None
        return out

    def passed_url(self) -> str:
        """The URL with only the options handed to the client library."""
        return urlunsplit(self.parts._replace(query=urlencode(self.passed)))


def _redacted(exc: BaseException, url: str) -> str:
    """``exc``'s text with anything of ``url``'s userinfo removed."""
    text = str(exc)
    userinfo = url.partition("://")[2].partition("@")
    if userinfo[1]:
        secret = userinfo[0].partition(":")[2]
        if secret:
            text = text.replace(secret, "***")
    return text
