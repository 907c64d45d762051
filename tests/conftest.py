import os

import pytest

# Tests never reach a model hub: everything the course loads is embedded in the kit.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

# The long cases `make test-fast` leaves out (marked `slow` here, by node id prefix, so the list is in one
# place): grading a whole class and the submission round trip, regenerating every lesson with nbgrader.
# `make test` (CI) runs them; a test can also carry @pytest.mark.slow itself.
SLOW = (
    "tests/test_grading.py::test_every_submission_is_reported",
    "tests/test_grading.py::test_whole_notebooks",
    "tests/test_roundtrip.py::",
    "tests/test_pipeline.py::test_lesson_is_what_the_pipeline_generates",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
