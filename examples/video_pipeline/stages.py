"""The pipeline's stages; each is one group, run by worker processes of its own.

    python -m examples.video_pipeline.stages STAGE --url URL --namespace NS --workdir DIR

    stage      reads        writes       per 5-minute video (in proportion to length)
    transcode  uploads      transcoded   40 ms; some fail their first tries and a few
                                         every try: retried with back-off, then
                                         dead-lettered to uploads.transcode.dlq
    compress   transcoded   compressed   150 ms: the slow stage, several processes
    store      compressed   stored       20 ms: the files put in object storage
    publish    stored       the catalog  the video put in the public feed, once
                                         (:mod:`.catalog`, idempotent by video id)

Each stage is one ``@app.consumer`` with its own concurrency, run by
``Worker(app).run()`` until SIGTERM. A stage hands its result to the next as an
``Output``, published before its input is acked, so a crash in between hands
the input to the group again and the next stage sees the result twice (same
message id: an output's id derives from its input's). Only the last stage must
be idempotent for the pipeline to publish each video once.

Once subscribed, a stage process creates ``DIR/ready.<stage>.<pid>``, so the
parent uploads once every stage runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polybus import Bus, Delivery
from polybus.patterns import App, Output, RetryPolicy, Worker
from polybus.patterns.dlq import dead_letter_topic
from polybus.patterns.retry import retry_topic

from .. import _support
from .catalog import Catalog
from .media import TYPICAL_LENGTH_S, WORK

PARTITIONS = 4
SESSION_S = 2.0  # of the multi-process stage: a killed member's work moves on after it


@dataclass(frozen=True)
class Stage:
    name: str  #: also the name of its group
    source: str  #: the topic it reads (in the run's namespace)
    concurrency: int  #: handler threads per process
    work_s: float  #: simulated seconds of work for a video of TYPICAL_LENGTH_S
    processes: int  #: how many worker processes the parent starts


STAGES = {
    s.name: s
    for s in (
        Stage("transcode", "uploads", concurrency=4, work_s=0.04, processes=1),
        Stage("compress", "transcoded", concurrency=3, work_s=0.15, processes=2),
        Stage("store", "compressed", concurrency=2, work_s=0.02, processes=1),
        Stage("publish", "stored", concurrency=1, work_s=0.0, processes=1),
    )
}
#: the topic each stage writes its results to (publish writes to the catalog)
OUTPUTS = {"transcode": "transcoded", "compress": "compressed", "store": "stored"}

# Transcoding back-off: 0.2, 0.4, 0.8 s between the four tries (less up to 20 % jitter).
TRANSCODE_RETRY = RetryPolicy(max_attempts=4, initial_delay=0.2, multiplier=2.0, max_delay=1.0)


def catalog_path(workdir: Path) -> Path:
    return workdir / "catalog.sqlite3"


def declare(bus: Bus, args: argparse.Namespace) -> None:
    """Declare every topic and group of the pipeline, the stages' retry and dead-letter
    topics included; idempotent. Run once before the stages start: processes that
    start together would otherwise all create the same new topics at once, and on
    Kafka one that finds a topic another has just created may not see it yet."""
    for stage in STAGES.values():
        source = _support.topic(args, stage.source)
        retries, dead = retry_topic(source, stage.name), dead_letter_topic(source, stage.name)
        bus.declare(source, partitions=PARTITIONS, groups=[stage.name])
        bus.declare(retries, groups=[retries])  # each read by a group of its own name
        bus.declare(dead, partitions=1, groups=[dead])


def build_app(stage: Stage, args: argparse.Namespace) -> App:
    """An App with the one consumer of ``stage``."""
    app = App(args.url)
    source = _support.topic(args, stage.source)
    options: dict[str, Any] = {"group": stage.name, "concurrency": stage.concurrency}
    if stage.processes > 1:
        # A dead member's work moves on after SESSION_S. On Redis that is also how long
        # a live member may hold a delivery before another may claim it, and members
        # share partitions: so take no more than the threads will start soon.
        options |= {
            "session_timeout": SESSION_S,
            "batch": stage.concurrency,
            "max_held": 4 * stage.concurrency,
        }
    if stage.name == "transcode":
        options["retry"] = TRANSCODE_RETRY

    if stage.name == "publish":
        catalog = Catalog(catalog_path(Path(args.workdir)))

        @app.consumer(source, **options)
        def publish(d: Delivery) -> None:
            video: dict[str, Any] = d.value
            catalog.publish(video["id"], video["title"], video["url"], d.message.id)

        return app

    work = WORK[stage.name]
    target = _support.topic(args, OUTPUTS[stage.name])

    @app.consumer(source, **options)
    def handle(d: Delivery) -> Output:
        video: dict[str, Any] = d.value
        time.sleep(stage.work_s * video["seconds"] / TYPICAL_LENGTH_S)
        return Output(target, video | work(video, d.attempt), key=video["id"])

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--workdir", required=True, help="where the catalog and ready files are")
    args = parser.parse_args(argv)
    # polybus's warnings (a video dead-lettered, a broker lost), marked with the stage;
    # the broker clients' own log records stay where they send them
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"  {args.stage}[{os.getpid()}]: %(message)s"))
    logging.getLogger("polybus").addHandler(handler)
    worker = Worker(build_app(STAGES[args.stage], args), stop_timeout=5.0)
    worker.start()
    (Path(args.workdir) / f"ready.{args.stage}.{os.getpid()}").touch()
    worker.run()  # until SIGTERM


if __name__ == "__main__":
    main()
