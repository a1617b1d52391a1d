"""The seed of randomised tests: printed, overridden by TORCHCALLBACKS_TEST_SEED, used everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import SEED_VARIABLE, choose_seed

TESTS = Path(__file__).resolve().parent


def test_the_environment_variable_overrides_the_seed() -> None:
    assert choose_seed({SEED_VARIABLE: "1234"}) == 1234
    assert choose_seed({SEED_VARIABLE: " 7 "}) == 7
    draws = {choose_seed({}) for _ in range(8)}
    assert len(draws) > 1 and all(0 <= seed < 2**32 for seed in draws)  # fresh draws without it
    assert len({choose_seed({SEED_VARIABLE: ""}) for _ in range(8)}) > 1  # set but empty: as unset


def test_the_fixture_prints_the_seed_it_returns(capsys: pytest.CaptureFixture[str], random_seed: int) -> None:
    printed = capsys.readouterr().out
    assert f"{SEED_VARIABLE}={random_seed}" in printed and "test_the_fixture_prints_the_seed_it_returns" in printed


def test_the_fixture_takes_the_seed_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                         request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv(SEED_VARIABLE, "99")
    assert request.getfixturevalue("random_seed") == 99


def test_no_test_draws_a_seed_of_its_own() -> None:
    """A seed drawn anywhere else would be neither printed nor replayable."""
    own_draws = re.compile(r"os\.urandom|SystemRandom|random\.Random\(\)|random\.seed\(\)|default_rng\(\)")
    offenders = [
        f"{path.relative_to(TESTS)}:{number}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name not in {"conftest.py", "test_seeds.py"}
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if own_draws.search(line)
    ]
    assert offenders == []
