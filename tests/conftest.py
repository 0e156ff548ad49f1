import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (distributed.py, tiny.py), also in spawned ranks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The tiny runs' token file (tests/tiny.py)."""
    import tiny

    return tiny.write_corpus(tmp_path_factory.mktemp("data") / "tokens.bin")
