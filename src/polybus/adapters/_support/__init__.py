"""The toolkit under the adapters, session stores and inboxes: what they would otherwise
each write with their own rules.

- :mod:`.options`: one reader of URL options (flags, numbers, durations, choices),
  whose every error names the option and shows the URL with its secrets hidden;
- :mod:`.connect`: the connect deadline and the "is anybody there" check;
- :mod:`.backoff`: the one back-off every retry and reconnect loop waits with;
- :mod:`.errors`: the one shape of error mapping, a context manager per client library
  (``kafka_errors``, ``amqp_errors``, ``redis_errors``) built on its ``map_error``;
- :mod:`.redis` and :mod:`.native`: one way to open a Redis client and the native
  engine's log from a URL, and redis-py's errors as polybus errors.

Only the first three load here; the client-specific modules are imported by path, so
a plain install never imports redis-py or the engine through this package.
"""

from .backoff import Backoff
from .connect import CONNECT_TIMEOUT, ensure_reachable
from .options import Options

__all__ = ["CONNECT_TIMEOUT", "Backoff", "Options", "ensure_reachable"]
