# Until the lead lists "tests.fixtures.simulator" in tests/conftest.py's pytest_plugins.
from tests.fixtures.simulator import *  # noqa: F403
