"""The media work the stages simulate: what each does to a video, and how it fails.

A video is a dict (its id, title, length in ``seconds``, and what the stages before
added). Each function returns what its stage adds to it; the stage sleeps as long as
the work would take, in proportion to the video's length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RENDITIONS = ("1080p", "720p", "480p")
TYPICAL_LENGTH_S = 300  #: a stage's ``work_s`` is for a video this long


class TranscoderBusy(Exception):
    """A transient failure: the same video transcodes on a later try."""


class CorruptStream(Exception):
    """The upload cannot be decoded: every try fails, so it ends in the dead letters."""


def transcode(video: dict[str, Any], attempt: int) -> dict[str, Any]:
    if video["corrupt"]:
        raise CorruptStream(f"{video['id']}: no decodable video track")
    if attempt <= video["flaky"]:
        raise TranscoderBusy(f"{video['id']}: no transcoder free (try {attempt})")
    return {"renditions": list(RENDITIONS), "transcode_attempts": attempt}


def compress(video: dict[str, Any], attempt: int) -> dict[str, Any]:
    return {"megabytes": {r: video["seconds"] // (2**n) for n, r in enumerate(RENDITIONS)}}


def store(video: dict[str, Any], attempt: int) -> dict[str, Any]:
    return {"url": f"https://cdn.example.com/videos/{video['id']}/"}


#: what each stage but the last does to a video (given the try number); the result is
#: merged into the video and handed to the next stage
WORK: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "transcode": transcode,
    "compress": compress,
    "store": store,
}
