import pytest

from qstrategies import TinyTokenizer


@pytest.fixture
def tok():
    return TinyTokenizer()
