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


# what setup_distributed and torchrun put in the environment: a test that leaves them (or a process
# group) in the pytest process makes later tests' subprocesses join its store (EADDRINUSE)
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_process_group(request):
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    was_initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    yield
    if was_initialized or "nccl_group" in request.fixturenames:  # tests/distributed/test_cuda.py shares one group on purpose
        return
    leaked = [k for k in _DIST_ENV if os.environ.get(k) != before[k]]
    for k in leaked:
        if before[k] is None:
            del os.environ[k]
        else:
            os.environ[k] = before[k]
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if initialized:
        torch.distributed.destroy_process_group()
    if leaked or initialized:
        pytest.fail(
            f"the test left {leaked or ''}{' and ' if leaked and initialized else ''}{'a process group' if initialized else ''} in the pytest process; run it in a subprocess or clean up"
        )
