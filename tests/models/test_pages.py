"""models/pages.py: transparent huge pages off for the length of a load, then as they were."""

from __future__ import annotations

import sys

import pytest

from sdtrain.models import pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")


@linux
def test_huge_pages_are_off_inside_and_back_on_after():
    assert pages.huge_pages_disabled() is False
    with pages.small_pages():
        assert pages.huge_pages_disabled() is True
    assert pages.huge_pages_disabled() is False


@linux
def test_back_on_after_an_error():
    with pytest.raises(RuntimeError), pages.small_pages():
        raise RuntimeError("load failed")
    assert pages.huge_pages_disabled() is False


@linux
def test_a_process_that_had_them_off_keeps_them_off():
    prctl = pages._prctl()
    assert prctl(pages.PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    try:
        with pages.small_pages():
            assert pages.huge_pages_disabled() is True
        assert pages.huge_pages_disabled() is True
    finally:
        prctl(pages.PR_SET_THP_DISABLE, 0, 0, 0, 0)


def test_the_model_load_runs_with_small_pages(monkeypatch):
    import sdtrain.models.load as load
    from sdtrain.config.sections import ModelSection

    seen = []
    real = load._load_base

    def spy(*args, **kwargs):
        seen.append(pages.huge_pages_disabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "_load_base", spy)
    load.load_bundle(ModelSection(pretrained_model_name_or_path="builtin:tiny-sd1"))
    assert seen == [True if sys.platform.startswith("linux") else None]


def test_nothing_happens_off_linux(monkeypatch):
    monkeypatch.setattr(pages.sys, "platform", "darwin")
    assert pages.huge_pages_disabled() is None
    with pages.small_pages():
        pass
