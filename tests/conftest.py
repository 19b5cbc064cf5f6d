import os
import sys

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the in-process Tune tests (no dashboard: faster start)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the runner gets as far as its Ray module (everything before it has run)."""
    class NotRay:
        def __getattr__(self, name):
            raise AssertionError("the study reached Ray")
    monkeypatch.setitem(sys.modules, "dsdtune.study.run", NotRay())
