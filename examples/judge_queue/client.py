"""The endpoint's clients: a small JSON-over-HTTP client and the load generator.

The load generator posts submissions from a thread, one after another over one
keep-alive connection (as a single busy client would), optionally paced, and times
each POST from the request to the end of the 202 answer.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .problems import Sample

HTTP_TIMEOUT_S = 10.0


class Client:
    """JSON requests to the endpoint over one connection; use it from one thread."""

    def __init__(self, port: int) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        self._connection.request(method, path, body=data, headers=headers)
        response = self._connection.getresponse()
        return response.status, json.loads(response.read())

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise OSError(f"GET {path} answered {status}: {body}")
        return body

    def close(self) -> None:
        self._connection.close()


@dataclass(frozen=True)
class Posted:
    id: str
    sample: Sample
    seconds: float  #: how long the POST took


class LoadGenerator:
    """Posts ``samples`` from a thread of its own, one every ``interval`` seconds at most
    (0: as fast as the endpoint answers). ``posted`` grows as they are accepted."""

    def __init__(self, port: int, samples: Sequence[Sample], interval: float = 0.0) -> None:
        self.samples = samples
        self.posted: list[Posted] = []
        self.error: BaseException | None = None
        self._port = port
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="load-generator", daemon=True)

    def start(self) -> LoadGenerator:
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        """All posted, or stopped by an error (which :meth:`join` raises)."""
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"posting did not end within {timeout:g} s")
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        client = Client(self._port)
        try:
            next_post = time.monotonic()
            for sample in self.samples:
                time.sleep(max(0.0, next_post - time.monotonic()))
                next_post = time.monotonic() + self._interval
                started = time.perf_counter()
                status, body = client.request(
                    "POST", "/submissions", {"problem": sample.problem, "source": sample.source}
                )
                seconds = time.perf_counter() - started
                if status != 202:
                    raise OSError(f"POST /submissions answered {status}: {body}")
                self.posted.append(Posted(body["id"], sample, seconds))
        except Exception as exc:  # handed to the main thread by join()
            self.error = exc
        finally:
            client.close()


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]
