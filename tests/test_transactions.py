"""The transaction conformance suite, run on every backend in polybus.testing.plugin.BACKENDS."""

from polybus.testing.transactions import *  # noqa: F403
