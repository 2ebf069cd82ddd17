import os
import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data; skips when absent unless MULTIHASH_REQUIRE_SHARED_DATA=1."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("MULTIHASH_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"MULTIHASH_REQUIRE_SHARED_DATA=1 but {SHARED_DATA} does not exist")
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA
