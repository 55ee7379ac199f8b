"""The patterns conformance suite, run on every backend in polybus.testing.plugin.BACKENDS."""

from polybus.testing.middleware import *  # noqa: F403
from polybus.testing.otel_metrics import *  # noqa: F403
from polybus.testing.patterns import *  # noqa: F403
from polybus.testing.tracing import *  # noqa: F403
