pytest_plugins = ["polybus.testing.plugin"]
