"""Shared pytest configuration: the guest harness plugin (kernel matrix options and guest fixtures),
and pytester for the plugin's own unit tests."""

pytest_plugins = ["harness.pytest_plugin", "pytester"]
