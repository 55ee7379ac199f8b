"""Two-player chess over pub/sub: two game servers, a topic keyed by game, a group each.

* Two server processes, ``east`` and ``west``, each hold one player's connection (a
  simulated player: a greedy engine with a seeded random generator). They play several
  games at once, all on one topic, ``games``, keyed by the game id: the key picks the
  partition, so each game's moves stay in order.
* A server publishes its player's move on the games topic; the opponent's server reads
  it in its durable group, applies it and publishes its reply. Every move carries its ply
  number, so a copy or a gap is seen at once.
* Each server reads the games topic in a durable group of its own. The groups are
  declared here, before either server starts, so the first move cannot be published
  before the opponent listens: it waits in the opponent's group until it reads it.
* Games end by checkmate, stalemate, the draw rules or the ply cap. Each server then
  reports its final position and move list on ``results``.
* This process is the referee: it reads the games topic in a group of its own and
  replays each game as it was published. At the end it checks that, for every game,
  both servers and the topic hold the same moves and the same final position, with no
  ply missing and none applied twice. Then it stops the servers with SIGTERM.

    python -m examples.chess [--url URL] [--games N] [--max-plies N] [--quick]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from typing import Any

import chess
import polybus

from .. import _support
from .player import outcome
from .protocol import (
    PARTITIONS,
    REFEREE,
    SERVERS,
    Game,
    games_topic,
    group,
    pairings,
    results_topic,
)

SERVER = "examples.chess.server"
DEADLINE_S, DEADLINE_QUICK_S = 90.0, 30.0  # for every game to end and be reported
STOP_S = 15.0  # how long a server may take to stop after SIGTERM before it is killed
DRAIN_S = 0.5  # after the last report, watch this long for late copies
SHOWN_PROBLEMS = 4  # in the FAILED line; the rest are counted


class Replay:
    """A game as its topic holds it: the referee's own board, built from the moves."""

    def __init__(self, game: Game, max_plies: int) -> None:
        self.game = game
        self.max_plies = max_plies
        self.board = chess.Board()
        self.partitions: set[int] = set()  # one, since the game id is the key
        self.duplicates = 0
        self.problems: list[str] = []

    @property
    def outcome(self) -> str | None:
        return outcome(self.board, self.max_plies)

    def add(self, move: dict[str, Any], partition: int) -> None:
        self.partitions.add(partition)
        ply, board = move["ply"], self.board
        if ply <= board.ply():
            if board.move_stack[ply - 1].uci() == move["uci"]:
                self.duplicates += 1  # published twice (a retried publish): harmless
            else:
                self._problem(f"ply {ply} was {board.move_stack[ply - 1]}, now {move['uci']}")
            return
        if ply > board.ply() + 1:
            self._problem(f"ply {ply} came after ply {board.ply()}: a move was lost")
            return
        mover = self.game.white if board.turn == chess.WHITE else self.game.black
        if move["by"] != mover:
            self._problem(f"ply {ply} was played by {move['by']}, not {mover}")
        if self.outcome is not None:
            self._problem(f"ply {ply} was played after the game ended ({self.outcome})")
        try:
            board.push_uci(move["uci"])
        except ValueError as exc:
            self._problem(f"ply {ply}: {exc}")
            return
        if board.fen() != move["fen"]:
            self._problem(f"ply {ply} gives {board.fen()}, its message says {move['fen']}")

    def _problem(self, text: str) -> None:
        self.problems.append(f"{self.game.id}: topic: {text}")


def stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM each server, then kill what is still running after ``STOP_S``; exit codes."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(STOP_S))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


class Referee:
    """Reads the games and the results in the referee's durable group, as they come."""

    def __init__(self, bus: polybus.Bus, args: argparse.Namespace, games: list[Game]) -> None:
        self.games = games
        self.replays = {game.id: Replay(game, args.max_plies) for game in games}
        self.reports: dict[tuple[str, str], Any] = {}  # (server, game) -> its report
        self._moves = bus.subscribe(games_topic(args), group(args, REFEREE))
        self._results = bus.subscribe(results_topic(args), group(args, REFEREE))

    def poll(self) -> None:
        """Take what arrived on both topics, waiting briefly on each."""
        for d in self._moves.fetch(100, timeout=0.05):
            self.replays[d.message.value["game"]].add(d.message.value, d.partition)
            d.ack()
        for d in self._results.fetch(100, timeout=0.01):
            report = d.message.value
            self.reports[report["server"], report["game"]] = report
            d.ack()

    @property
    def finished(self) -> bool:
        return len(self.reports) == len(SERVERS) * len(self.games)

    @property
    def stopped(self) -> bool:
        """Whether a server reported a problem that stopped one of its games."""
        return any(report["problems"] for report in self.reports.values())

    def line(self) -> str:
        plies = "  ".join(
            f"{r.game.id} {r.board.ply()}{'' if r.outcome is None else ' over'}"
            for r in self.replays.values()
        )
        return f"plies: {plies}  reports {len(self.reports)}/{len(SERVERS) * len(self.games)}"

    def problems(self) -> list[str]:
        """For every game: the topic against the rules, each server's report against the
        topic."""
        problems = []
        for game in self.games:
            replay = self.replays[game.id]
            problems += replay.problems
            if replay.outcome is None:
                problems.append(f"{game.id}: the topic stops at ply {replay.board.ply()}")
            if len(replay.partitions) > 1:
                problems.append(f"{game.id}: moves on partitions {sorted(replay.partitions)}")
            moves = [m.uci() for m in replay.board.move_stack]
            for server in SERVERS:
                report = self.reports.get((server, game.id))
                if report is None:
                    problems.append(f"{game.id}: no report from {server}")
                    continue
                problems += report["problems"]
                if report["moves"] != moves or report["fen"] != replay.board.fen():
                    problems.append(
                        f"{game.id}: {server} ended at ply {len(report['moves'])} "
                        f"({report['fen']}), the topic at ply {len(moves)} ({replay.board.fen()})"
                    )
        return problems


def main(argv: list[str] | None = None) -> int:
    args = _support.parse(__doc__, argv, games=(8, 3), max_plies=(300, 60))
    _support.check_url(args.url)
    deadline_s = DEADLINE_QUICK_S if args.quick else DEADLINE_S
    games = pairings(args.games)
    with polybus.connect(args.url) as bus:
        # Every group before the first move: a move waits for a reader that starts late.
        readers = [group(args, reader) for reader in (*SERVERS, REFEREE)]
        bus.declare(games_topic(args), partitions=PARTITIONS, groups=readers)
        bus.declare(results_topic(args), partitions=1, groups=[group(args, REFEREE)])
        options = ["--url", args.url, "--namespace", args.namespace]
        options += ["--games", str(args.games), "--max-plies", str(args.max_plies)]
        procs = [_support.spawn(SERVER, "--name", name, *options) for name in SERVERS]
        try:
            referee = Referee(bus, args, games)
            deadline = time.monotonic() + deadline_s
            with _support.progress(referee.line):
                while not (referee.finished or referee.stopped) and time.monotonic() < deadline:
                    if any(proc.poll() is not None for proc in procs):
                        break  # a server died: its games cannot finish
                    referee.poll()
                drain_until = min(deadline, time.monotonic() + DRAIN_S)
                while time.monotonic() < drain_until:
                    referee.poll()
        finally:
            codes = stop(procs)
    for replay in referee.replays.values():
        board, game = replay.board, replay.game
        print(
            f"{game.id} on partition {min(replay.partitions, default='-')}  "
            f"{game.white} (white) - {game.black}: "
            f"{replay.outcome or 'unfinished'} after {board.ply()} plies, "
            f"{board.result(claim_draw=True)}  {board.fen()}"
        )
    problems = referee.problems()
    if not (referee.finished or referee.stopped) and time.monotonic() >= deadline:
        problems.insert(0, f"not finished within {deadline_s:g} s")
    if any(codes):
        problems.insert(0, f"server exit statuses {codes}")
    if len(problems) > SHOWN_PROBLEMS:
        problems[SHOWN_PROBLEMS:] = [f"and {len(problems) - SHOWN_PROBLEMS} more"]
    published_twice = sum(r.duplicates for r in referee.replays.values())
    dropped = sum(r["duplicates"] for r in referee.reports.values())
    plies = sum(r.board.ply() for r in referee.replays.values())
    return _support.verdict(
        problems,
        f"{len(games)} games, {plies} plies: both servers and the topic agree on every move "
        f"and final position; no ply lost or applied twice ({published_twice} moves published "
        f"twice, {dropped} copies dropped by ply)",
    )


if __name__ == "__main__":
    sys.exit(main())
