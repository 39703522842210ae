"""Hypothesis profiles for the fuzz tests.

``HYPOTHESIS_PROFILE=ci`` is derandomized with a modest example count (the whole directory runs in
well under a minute); ``dev`` (the default) explores more and keeps failing examples in
``${DBD_CACHE_DIR:-~/.cache/dattobd-harness}/hypothesis`` so a failure replays first next time
(``ci`` cannot: Hypothesis forbids a database with derandomize, and replays the same examples anyway).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from vmimages.cache import cache_dir

_DATABASE = DirectoryBasedExampleDatabase(str(cache_dir() / "hypothesis"))
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]

# Hypothesis forbids a database with derandomize (every run replays the same examples anyway).
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=60,
    print_blob=True,
    deadline=None,
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "dev", database=_DATABASE, max_examples=300, deadline=None, suppress_health_check=_SUPPRESS
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
