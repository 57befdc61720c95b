import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# Tests live in one folder per stage (language, ir, plan, content, codegen, runtime, simulator,
# e2e). `strategies.py` sits here, and a few test modules share helpers across stages
# (`from test_backends import ...`), so this folder and every stage folder are importable.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
for _stage in sorted(os.listdir(_HERE)):
    if os.path.isdir(os.path.join(_HERE, _stage)) and _stage not in ("golden", "__pycache__"):
        sys.path.append(os.path.join(_HERE, _stage))

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
    # read by tests/language/test_fuzz_lang.py when it is imported (after this hook)
    if config.getoption("--fuzz"):
        os.environ["ATTNLANG_FUZZ"] = "1"


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
