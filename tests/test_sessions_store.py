"""The session store conformance suite, run on every store in polybus.testing.sessions.STORES."""

from polybus.testing.sessions import *  # noqa: F403
