"""The conformance suite and its fixtures, shipped so every adapter runs the same tests.

Install with the ``testing`` extra (``pip install 'polybus[testing]'``), which
brings pytest; nothing else in polybus imports this package.

Use it from a test package::

    # conftest.py
    pytest_plugins = ["polybus.testing.plugin"]

    # test_conformance.py
    from polybus.testing.conformance import *  # noqa: F403

Each test runs once per backend in :data:`polybus.testing.plugin.BACKENDS`.
A backend whose server is not reachable is skipped with a message saying how
to start it, or fails when ``CI=true``.
"""
