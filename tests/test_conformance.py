"""The conformance suite, run on every backend in polybus.testing.plugin.BACKENDS."""

from polybus.testing.cloudevents import *  # noqa: F403
from polybus.testing.conformance import *  # noqa: F403
