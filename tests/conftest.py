"""Shared test configuration: markers (fixtures follow in the engine refactor)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU; skipped without one")
