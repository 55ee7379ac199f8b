"""One game server: it holds one player's connection and plays that player's side of
every game, as a process of its own.

* It runs one ``@app.consumer`` on the games topic, in the server's durable group
  (``<namespace>.east`` or ``<namespace>.west``), with a few handler threads. The worker
  hands a key's messages to one thread, in order, so each game's moves are handled one
  after another while the games go on side by side. A new game needs no new
  subscription: it is just a new key.
* Every move of a game comes back to it, its own ones included. A move is applied only
  when its ply is the next one. A copy of a ply already on the board (its own move coming
  back, or a move delivered again) is checked against the board and dropped, so a move is
  never applied twice; a ply that skips ahead is a gap and stops the game.
* After applying the opponent's move it chooses its player's reply, publishes it and only
  then puts it on its board: if the publish fails, the handler raises, the delivery is
  tried again, and it finds the board as it was.
* The parent declared every group before starting the servers, so a move published
  before the opponent's server subscribed waits for it in its group: the white server
  plays its first moves as soon as it starts.

    python -m examples.chess.server --name east --url URL --namespace NS --games 3 \\
        --max-plies 60
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import chess
import polybus
from polybus import Delivery
from polybus.patterns.worker import App, Worker

from .player import Player, outcome
from .protocol import SERVERS, Game, games_topic, group, move_message, pairings, results_topic

LANES = 4  # handler threads; a game's moves all go to the same one
PARENT_CHECK_S = 0.5  # how often a server looks whether the run that started it is gone


class Table:
    """One game as this server sees it: its board and what arrived on the game's topic."""

    def __init__(self, game: Game, me: str, args: argparse.Namespace, bus: polybus.Bus) -> None:
        self.game = game
        self.me = me
        self.max_plies: int = args.max_plies
        self.bus = bus
        self.topic = games_topic(args)
        self.results = results_topic(args)
        self.player = Player(me, game.id)
        self.board = chess.Board()
        self.copies: Counter[int] = Counter()  # ply -> copies handled
        self.duplicates = 0
        self.problems: list[str] = []
        self.reported = False

    def open(self) -> None:
        """Play the first move if this server's player has white."""
        if self.game.white == self.me:
            self.board = self._play(self.board.copy())

    def on_move(self, move: dict[str, Any]) -> None:
        """Handle one move of this game from the games topic."""
        ply: int = move["ply"]
        if ply <= self.board.ply():
            self._check_copy(move)
        elif ply == self.board.ply() + 1 and move["by"] != self.me:
            self._answer(move)
        else:
            self._problem(f"ply {ply} by {move['by']} came with the board at {self.board.ply()}")
        self._report_when_done()
        self.copies[ply] += 1  # last: a handler that raised is run again from scratch

    def _check_copy(self, move: dict[str, Any]) -> None:
        ply = move["ply"]
        if self.copies[ply]:
            self.duplicates += 1  # a copy delivered again: dropped, never applied twice
        on_board = self.board.move_stack[ply - 1].uci()
        if move["uci"] != on_board:
            self._problem(f"ply {ply} is {move['uci']} on the topic but {on_board} here")

    def _answer(self, move: dict[str, Any]) -> None:
        board = self.board.copy()
        try:
            board.push_uci(move["uci"])
        except ValueError as exc:  # illegal or malformed
            self._problem(f"ply {move['ply']}: {exc}")
            return
        if board.fen() != move["fen"]:
            self._problem(f"ply {move['ply']} gives {board.fen()} here, {move['fen']} there")
            return
        if outcome(board, self.max_plies) is None:
            board = self._play(board)
        self.board = board

    def _play(self, board: chess.Board) -> chess.Board:
        """Push this player's move on ``board`` and publish it; ``board`` is a copy, so a
        failed publish leaves the table as it was."""
        board.push(self.player.choose(board))
        self.bus.publish(self.topic, move_message(self.game.id, board, self.me), key=self.game.id)
        return board

    def _problem(self, text: str) -> None:
        self.problems.append(f"{self.game.id}: {self.me}: {text}")

    def _report_when_done(self) -> None:
        """Report the game once it is over, or once a problem stopped it."""
        why = outcome(self.board, self.max_plies)
        if self.reported or (why is None and not self.problems):
            return
        report = {
            "server": self.me,
            "game": self.game.id,
            "outcome": why or "stopped",
            "moves": [m.uci() for m in self.board.move_stack],
            "fen": self.board.fen(),
            "duplicates": self.duplicates,
            "problems": self.problems,
        }
        self.bus.publish(self.results, report, key=self.game.id)
        self.reported = True


def stop_with_parent() -> None:
    """SIGTERM this process once its parent is gone (killed, say): a server never outlives
    the run that started it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--name", choices=SERVERS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--games", type=int, required=True)
    parser.add_argument("--max-plies", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM."""
    args = parse(argv)
    stop_with_parent()
    with polybus.connect(args.url) as bus:
        tables = {game.id: Table(game, args.name, args, bus) for game in pairings(args.games)}
        app = App()

        @app.consumer(games_topic(args), group=group(args, args.name), concurrency=LANES)
        def on_move(delivery: Delivery) -> None:
            move = delivery.message.value
            tables[move["game"]].on_move(move)

        # Before this server listens: the opponent's group holds the move until it reads it.
        for table in tables.values():
            table.open()
        Worker(app, bus).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
