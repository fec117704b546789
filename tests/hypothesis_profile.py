"""Hypothesis settings for edgevlm's fuzzers: one saved-example database per fuzzer under tests/hypothesis-examples/
(committed), written by local runs and read-only under CI=true, so a failure found locally (saved there, shrunk)
replays first in CI. Each fuzzer fixes its seed and bounds its examples, so a run tests the same cases in about the
same time; the saved examples replay before them."""
from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

EXAMPLES = Path(__file__).parent / "hypothesis-examples"
# no target or explain phase: they cost examples (each may load a bundle) and say little about a crafted file
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
# the fuzzers' examples load bundles and write files: slow and large by design
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
           HealthCheck.filter_too_much]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def register() -> None:
    """Profiles `edgevlm` (local) and `edgevlm-ci` (CI=true: nothing written); the one for this run is loaded.
    Their database serves plain @given tests; the fuzzers name their own (example_database)."""
    common = dict(deadline=None, print_blob=True, suppress_health_check=SLOW_OK, phases=PHASES)
    settings.register_profile("edgevlm", database=DirectoryBasedExampleDatabase(EXAMPLES / "tests"), **common)
    settings.register_profile("edgevlm-ci", database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(EXAMPLES / "tests")),
                              **common)
    settings.load_profile("edgevlm-ci" if in_ci() else "edgevlm")


def example_database(name: str):
    """The fuzzer `name`'s saved examples (its own folder: fuzzers share their test function's source, which is
    Hypothesis's key); read-only under CI."""
    database = DirectoryBasedExampleDatabase(EXAMPLES / name)
    return ReadOnlyDatabase(database) if in_ci() else database
