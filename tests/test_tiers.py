"""The test tiers (docs/design.md#tests): which tests `--fast` leaves out, the e2e tests' time
limit, and the processes the fast tier refuses to start. Each test runs a session of its own
with this project's conftest.py and pytest settings."""

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def session(pytester):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyprojecttoml((TESTS.parent / "pyproject.toml").read_text())
    return pytester


SAMPLE = """
import pytest

def test_unit(): pass

def test_using_a_finished_run(finished_run): pass

@pytest.mark.e2e
def test_marked_e2e(): pass

@pytest.mark.slow
def test_marked_slow(): pass

@pytest.mark.real_data
def test_marked_real_data(): pass
"""


def collected(session, *args: str) -> set[str]:
    result = session.runpytest("--collect-only", "-q", *args)
    return {line.split("::")[1] for line in result.outlines if "::" in line}


def test_the_fast_tier_leaves_out_the_marked_tests_and_every_user_of_a_process_fixture(session):
    session.makepyfile(test_sample=SAMPLE)
    assert collected(session, "--fast") == {"test_unit"}
    # The fixture's users are e2e wherever marks select, not only under --fast.
    assert collected(session, "-m", "e2e") == {"test_using_a_finished_run", "test_marked_e2e"}


def test_an_e2e_test_may_take_longer_than_the_others(session):
    session.makepyfile(
        test_sample="""
        from conftest import E2E_TIMEOUT_SECONDS

        def test_unit(request):
            assert request.node.get_closest_marker("timeout") is None
            assert int(request.config.getini("timeout")) < E2E_TIMEOUT_SECONDS

        def test_using_a_finished_run(request, finished_run): pass
        """
    )
    # Collected only: the finished run is not started, but the marks are set.
    items, _ = session.inline_genitems()
    limits = {item.name: item.get_closest_marker("timeout") for item in items}
    assert limits["test_using_a_finished_run"].args == (1200,)
    session.runpytest("-k", "test_unit").assert_outcomes(passed=1, deselected=1)


def test_the_fast_tier_fails_a_test_that_starts_nginx_or_ray_even_when_it_catches_the_refusal(session):
    session.makepyfile(
        test_sample="""
        import os, subprocess, sys
        from conftest import RAY_PACKAGE

        def test_starting_nginx():
            subprocess.run(["nginx", "-t"])

        def test_starting_ray_and_catching_the_error():
            # As Ray starts its workers (--help: were it started, it would only print its options).
            worker = os.path.join(RAY_PACKAGE, "_private", "workers", "default_worker.py")
            try:
                subprocess.run([sys.executable, worker, "--help"], capture_output=True)
            except Exception:
                pass

        def test_running_a_python_snippet():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        """
    )
    result = session.runpytest("--fast")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*HeavyProcessInFastTier: the fast tier starts no nginx: mark the test e2e*"])
    result.stdout.fnmatch_lines(["*this test tried to start ray, which the fast tier never starts: mark it e2e*"])
