import os

import pytest

# Tests never reach a model hub: everything the course loads is embedded in the kit.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

# The long cases `make test-fast` leaves out (`make test` and CI run them), marked `slow` here so that the
# list is in one place: grading a whole class (the tests of test_grading.py that use its `batch` fixture),
# the submission round trip, regenerating every lesson with nbgrader. A test can also carry
# @pytest.mark.slow itself.
SLOW_TESTS = ("tests/test_roundtrip.py::", "tests/test_pipeline.py::test_lesson_is_what_the_pipeline_generates")
SLOW_FIXTURES = {"tests/test_grading.py": "batch"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if item.nodeid.startswith(SLOW_TESTS) or SLOW_FIXTURES.get(path) in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
