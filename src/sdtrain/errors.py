"""Typed user-facing errors; the CLI renders every SdtrainError in one place (cli/render.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


class SdtrainError(Exception):
    """An error meant for the user: what happened, plus a hint saying what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass
class Problem:
    """One configuration problem, located as precisely as the source allows."""

    key: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    value: object = field(default=None)
    has_value: bool = False
    hint: str | None = None

    def location(self) -> str:
        """`file:line:col` as far as known ("<command line>" for flags)."""
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where


class ConfigError(SdtrainError):
    """Invalid configuration or usage. Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem], hint: str | None = None) -> None:
        count = len(problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{count} configuration {noun} found", hint)
        self.problems = problems


class UsageError(SdtrainError):
    """The command line itself is wrong (unknown flag, missing argument)."""

    exit_code = 2


class RunFolderBusy(SdtrainError):
    """Another run holds the output folder (a usage error: two runs must not share one)."""

    exit_code = 2


class DiskFullError(SdtrainError):
    """A write failed (or would fail) for lack of space; earlier files are intact."""


class DataError(SdtrainError):
    """The dataset cannot be used as given (missing folders, corrupt images, no images)."""


class ModelLoadError(SdtrainError):
    """A model file or folder cannot be loaded or saved."""


class MissingExtraError(SdtrainError):
    """An optional dependency is needed; the hint names the extra to install."""

    def __init__(self, what: str, extra: str, package: str) -> None:
        super().__init__(
            f"{what} needs the optional package '{package}', which is not installed",
            f"pip install 'sdtrain[{extra}]'  (or: pip install {package})",
        )
        self.extra = extra
        self.package = package


class TrainingError(SdtrainError):
    """Training cannot continue (non-finite losses, resume mismatch, ...)."""


class Interrupted(SdtrainError):
    """The user interrupted a run; a resumable state may have been written."""

    exit_code = 130
