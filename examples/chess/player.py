"""The simulated player behind each server's connection: a greedy one-ply chooser.

A player prefers a mate in one, then the most valuable capture or promotion, then a
check, and breaks ties with its own seeded random generator. The same seed and the same
position always give the same move, so a game depends only on the seeds, never on the
backend or on timing: a rerun on another backend plays the very same games.
"""

from __future__ import annotations

import random

import chess

__all__ = ["Player", "outcome"]

_VALUE = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9}


class Player:
    """One player's choices in one game: a function of the position, the player and the
    game, so the same game is played on every run."""

    def __init__(self, name: str, game: str) -> None:
        self._seed = f"{name}/{game}"

    def choose(self, board: chess.Board) -> chess.Move:
        """A legal move for the side to move on ``board`` (which must have one)."""
        # Seeded by the ply too: choosing again for the same position (a handler run
        # again after a failed publish) gives the same move.
        rng = random.Random(f"{self._seed}/{board.ply()}")
        return max(board.legal_moves, key=lambda move: self._score(board, move, rng))

    @staticmethod
    def _score(board: chess.Board, move: chess.Move, rng: random.Random) -> float:
        score = rng.random()  # the tie-break, and all there is to a quiet move
        if board.is_capture(move):
            victim = board.piece_type_at(move.to_square) or chess.PAWN  # None: en passant
            score += 10 * _VALUE[victim]
        if move.promotion:
            score += 10 * _VALUE[move.promotion]
        board.push(move)
        if board.is_checkmate():
            score += 1000
        elif board.is_check():
            score += 2
        board.pop()
        return score


def outcome(board: chess.Board, max_plies: int) -> str | None:
    """Why the game on ``board`` is over ("checkmate", "stalemate", ..., or "ply cap"),
    or None while it goes on. Draws a player may claim (threefold repetition, fifty
    moves) are claimed."""
    result = board.outcome(claim_draw=True)
    if result is not None:
        return result.termination.name.lower().replace("_", " ")
    if board.ply() >= max_plies:
        return "ply cap"
    return None
