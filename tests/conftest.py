import os
import pathlib

# One intra-op thread per test process, as the commands the tests start already run
# (tests/helpers/cli.py); set before torch is imported, so processes spawned by the tests
# (tests/helpers/distributed.py) inherit it too. Several threads per process on a machine whose
# cores are all busy (2-rank runs, other jobs) make in-process tests many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data; skips when absent unless MULTIHASH_REQUIRE_SHARED_DATA=1."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("MULTIHASH_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"MULTIHASH_REQUIRE_SHARED_DATA=1 but {SHARED_DATA} does not exist")
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA
