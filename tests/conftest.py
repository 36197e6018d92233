import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import settings  # noqa: E402

# CI runs the property tests derandomized: the same examples every run, so a red run is reproducible and
# a green one stays green. HYPOTHESIS_PROFILE=explore draws fresh random examples (run it when changing
# the merge core or the config loader; a failure prints the example to add as a regression case).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402
import torch  # noqa: E402

DEFAULT_TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' tiny models run fastest on one thread: their operations are too small to split, and on a
    busy machine a second thread makes every operation wait for a core (layer norms of a width-32 BERT took
    20 ms instead of microseconds). Modules on real-size models ask for the default back
    (:func:`default_torch_threads`); subprocesses keep theirs (OMP_NUM_THREADS)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(DEFAULT_TORCH_THREADS)


@pytest.fixture
def default_torch_threads():
    """Torch's own thread count for one test (the real MiniLM benchmark, the streaming merges' default
    worker count)."""
    torch.set_num_threads(DEFAULT_TORCH_THREADS)
    yield DEFAULT_TORCH_THREADS
    torch.set_num_threads(1)
