"""Shared by the model tests."""
import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every model test runs single-threaded (tests/conftest.py: `one_thread`)."""
