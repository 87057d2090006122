"""Third-party warnings stay off the terminal unless -v."""

from __future__ import annotations

import logging
import warnings

from sdtrain.log import setup_logging


def _emit() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("default")  # what Python does before setup_logging
        setup_logging(0)
        code = compile("warnings.warn('old api', FutureWarning)", "transformers/x.py", "exec")
        exec(code, {"warnings": warnings, "__name__": "transformers.x"})
        return [str(w.message) for w in caught]


def test_library_warnings_and_notices_hidden_by_default_shown_with_v():
    try:
        assert _emit() == []
        assert logging.getLogger("transformers").getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("bitsandbytes").getEffectiveLevel() == logging.ERROR
        with warnings.catch_warnings(record=True) as caught:
            setup_logging(1)
            warnings.warn("old api", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["old api"]
        assert logging.getLogger("transformers").level == logging.NOTSET
    finally:
        setup_logging(0)
