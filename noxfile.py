"""nox sessions: tests (default fast set), slow tests, lint, benchmarks."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session) -> None:
    # CPU torch first: a plain `torch` requirement pulls a multi-GB CUDA build
    session.install("torch==2.13.0")
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The default test run (what CI runs)."""
    _install(session)
    session.run("pytest", "-n", "2", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Full-size and long CPU tests."""
    _install(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint + format check."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "scripts")
    session.run("ruff", "format", "--check", "src", "tests")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (JSON on stdout)."""
    _install(session)
    for script in sorted(__import__("pathlib").Path("benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)
