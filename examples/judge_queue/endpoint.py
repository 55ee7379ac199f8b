"""The web endpoint: takes submissions over HTTP, enqueues them, serves their verdicts.

    POST /submissions       {"problem": NAME, "source": PROGRAM}
                            -> 202 {"id": ID, "status": "queued"}, Location: /submissions/ID
    GET  /submissions/ID    -> 200 {"id", "problem", "status": "queued" | "judged",
                                    "verdict", "judge", "ms"}  (the last three once judged)
    GET  /stats             -> 200 {"published": N, "judged": N}

A POST publishes the submission to the submissions topic and answers as soon as the
publish is confirmed: it never waits for a judge, so its latency is the publish's
whatever the judges' backlog. Verdicts come back on the verdicts topic, which this
endpoint reads in its own durable group (``endpoint``) with an ``App`` consumer and
keeps in memory, by submission id. Recording a verdict is idempotent, so a
redelivered copy changes nothing.
"""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import polybus
from polybus import Delivery
from polybus.patterns.worker import App, Worker

from .problems import PROBLEMS

MAX_BODY = 64 * 1024


class Submissions:
    """What the endpoint knows: the submissions it queued and the verdicts it read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._verdicts: dict[str, dict[str, Any]] = {}
        self._published = 0

    def queue(self, problem: str) -> str:
        """A new submission's id, known before its publish so a verdict always finds it."""
        submission_id = f"sub-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._problems[submission_id] = problem
        return submission_id

    def published(self) -> None:
        with self._lock:
            self._published += 1

    def forget(self, submission_id: str) -> None:
        """Its publish failed: the client was told so and nothing was queued."""
        with self._lock:
            self._problems.pop(submission_id, None)

    def judged(self, verdict: dict[str, Any]) -> None:
        with self._lock:
            self._problems.setdefault(verdict["id"], verdict["problem"])
            self._verdicts.setdefault(verdict["id"], verdict)

    def view(self, submission_id: str) -> dict[str, Any] | None:
        with self._lock:
            problem = self._problems.get(submission_id)
            verdict = self._verdicts.get(submission_id)
        if problem is None:
            return None
        view: dict[str, Any] = {"id": submission_id, "problem": problem, "status": "queued"}
        if verdict is not None:
            view.update(status="judged", **{k: verdict[k] for k in ("verdict", "judge", "ms")})
        return view

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"published": self._published, "judged": len(self._verdicts)}


def handler_for(
    bus: polybus.Bus, submissions_topic: str, state: Submissions
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client's requests share one connection
        # headers and body leave in two writes: without this, Nagle's algorithm holds the
        # body until the client's delayed ACK of the headers, 40 ms later
        disable_nagle_algorithm = True

        def do_POST(self) -> None:  # the http.server API
            if self.path != "/submissions":
                self._answer(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True  # the body stays unread
                self._answer(413, {"error": f"at most {MAX_BODY} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(length))
                problem, source = body["problem"], body["source"]
            except (ValueError, KeyError, TypeError):
                self._answer(400, {"error": 'expected {"problem": ..., "source": ...}'})
                return
            if problem not in PROBLEMS or not isinstance(source, str):
                self._answer(422, {"error": f"problems: {', '.join(PROBLEMS)}"})
                return
            submission_id = state.queue(problem)
            message = {"id": submission_id, "problem": problem, "source": source}
            try:
                bus.publish(submissions_topic, message, key=submission_id)
            except polybus.PolybusError as exc:
                state.forget(submission_id)
                self._answer(503, {"error": f"not queued: {exc}"})
                return
            state.published()
            location = f"/submissions/{submission_id}"
            self._answer(202, {"id": submission_id, "status": "queued"}, location=location)

        def do_GET(self) -> None:  # the http.server API
            if self.path == "/stats":
                self._answer(200, state.stats())
                return
            prefix, _, submission_id = self.path.rpartition("/")
            view = state.view(submission_id) if prefix == "/submissions" else None
            if view is None:
                self._answer(404, {"error": "not found"})
                return
            self._answer(200, view)

        def _answer(self, status: int, body: dict[str, Any], location: str | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if location is not None:
                self.send_header("Location", location)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the example's output

    return Handler


def serve(url: str, namespace: str, port_file: str) -> None:
    """Serve on a free 127.0.0.1 port, written to ``port_file``, until SIGTERM."""
    state = Submissions()
    app = App(url)

    @app.consumer(f"{namespace}.verdicts", group="endpoint")
    def record_verdict(d: Delivery) -> None:
        state.judged(d.value)

    submissions = f"{namespace}.submissions"
    with polybus.connect(url) as bus:
        bus.declare(submissions, groups=["judges"])  # now, so the first POST need not
        handler = handler_for(bus, submissions, state)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        # written whole, then renamed: the parent never reads half a port number
        partial = Path(f"{port_file}.partial")
        partial.write_text(str(server.server_address[1]))
        partial.rename(port_file)
        try:
            Worker(app).run()
        finally:
            server.shutdown()
            server.server_close()
