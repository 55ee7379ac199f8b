"""What the parent and the two game servers agree on: the games, the names, the messages.

* Game ``gN`` is played between the servers ``east`` and ``west``; east has white in the
  odd games, west in the even ones.
* Every game's moves go to one topic, ``<namespace>.games``, keyed by the game id: the key
  picks the partition, so one game's moves stay on one partition, in the order they were
  published. A move is ``{"game", "ply", "uci", "by", "fen"}``: ``ply`` numbers the
  half-moves from 1 and ``fen`` is the position after the move.
* Each reader (a server, or the parent's referee) reads the games topic in a durable
  group of its own, ``<namespace>.<reader>``: a Kafka group id is global to the cluster,
  so the namespace keeps runs apart there too.
* A server reports each game once, when it is over, or as soon as a problem stops it, to
  ``<namespace>.results`` as ``{"server", "game", "outcome", "moves", "fen",
  "duplicates", "problems"}``.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import chess

from .. import _support

__all__ = [
    "PARTITIONS",
    "REFEREE",
    "SERVERS",
    "Game",
    "games_topic",
    "group",
    "move_message",
    "pairings",
    "results_topic",
]

SERVERS = ("east", "west")
REFEREE = "referee"  # the parent's reader of the games and the results
PARTITIONS = 4  # of the games topic


class Game(NamedTuple):
    id: str
    white: str
    black: str


def pairings(count: int) -> list[Game]:
    """The ``count`` games of a run, colours alternating between the servers."""
    east, west = SERVERS
    return [Game(f"g{n}", *((east, west) if n % 2 else (west, east))) for n in range(1, count + 1)]


def games_topic(args: argparse.Namespace) -> str:
    return _support.topic(args, "games")


def results_topic(args: argparse.Namespace) -> str:
    return _support.topic(args, "results")


def group(args: argparse.Namespace, reader: str) -> str:
    """The durable group of ``reader`` (a server or the referee) on the topics it reads."""
    return _support.topic(args, reader)


def move_message(game: str, board: chess.Board, by: str) -> dict[str, Any]:
    """The message of the last move on ``board``."""
    return {
        "game": game,
        "ply": board.ply(),
        "uci": board.peek().uci(),
        "by": by,
        "fen": board.fen(),
    }
