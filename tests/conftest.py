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
