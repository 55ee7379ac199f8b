"""Two-player chess over pub/sub: two game servers, a topic keyed by game, a group each."""
