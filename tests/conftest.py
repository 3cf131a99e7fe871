"""Test-wide settings. Runs before any test module imports the kernels."""
import os

# No test may reach a hub: everything is built or written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (pytest.ini runs 2 workers, one a core), each worker computes on one thread:
# two workers at torch's default of one thread per core would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton's interpreter must be switched on before any @triton.jit function is defined, or the
# kernels fail with "0 active drivers" on a machine without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """{setting: folder} of tests/cli_runs.py's reference CLI runs, made once per session."""
    from tests.cli_runs import start_reference_runs

    return start_reference_runs(tmp_path_factory.mktemp("reference"))


def pytest_collection_modifyitems(items):
    """The tests of the bench/ modules are tests/test_bench_*.py: each is marked ``bench``."""
    for item in items:
        if item.path.name.startswith("test_bench_"):
            item.add_marker(pytest.mark.bench)
