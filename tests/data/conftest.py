import pytest

from alignkit.models.tiny import tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()
