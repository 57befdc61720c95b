import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# Bounded example counts keep the whole suite well under 15 minutes on 2 cores.
settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden files under tests/golden/ instead of comparing")
    parser.addoption("--fuzz", action="store_true", default=False,
                     help="run the parser/checker fuzz tests with 100,000 examples (default: a few thousand)")


def pytest_configure(config):
    # read by tests/test_fuzz_lang.py when it is imported (after this hook)
    if config.getoption("--fuzz"):
        os.environ["ATTNLANG_FUZZ"] = "1"


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
