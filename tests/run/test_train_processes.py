"""Launched runs: only the main process writes the files it shares with the others."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from sdtrain.run import train


class FakeProcesses:
    """Processes with a recorded barrier (engine/distributed.Processes' interface)."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.events: list[str] = []

    def wait(self) -> None:
        self.events.append("barrier")

    @contextlib.contextmanager
    def main_first(self):
        if not self.is_main:
            self.wait()
        yield self.is_main
        if self.is_main:
            self.wait()


@pytest.mark.parametrize("is_main", [True, False])
def test_class_images_are_generated_by_the_main_process_only(monkeypatch, is_main):
    import sdtrain.data.plan
    import sdtrain.tools.class_images

    processes = FakeProcesses(is_main)

    def fill(*_args, **_kwargs):
        processes.events.append("generate")

    def plan_for_run(_loaded, write_caches):
        processes.events.append(f"plan write_caches={write_caches}")
        return SimpleNamespace(require_valid=lambda: None, steps=None)

    monkeypatch.setattr(sdtrain.tools.class_images, "fill_class_images", fill)
    monkeypatch.setattr(sdtrain.data.plan, "plan_for_run", plan_for_run)
    config = SimpleNamespace(dreambooth=None, model=SimpleNamespace(clip_skip=None))
    prepared = SimpleNamespace(
        loaded=SimpleNamespace(config=config), command="dreambooth", state_config={}
    )
    plan = SimpleNamespace(indices=(0, 1))
    train._fill_class_images(prepared, None, processes, plan)  # type: ignore[arg-type]
    if is_main:
        assert processes.events == ["generate", "barrier", "plan write_caches=True"]
    else:  # waits for the main process's images, then only reads
        assert processes.events == ["barrier", "plan write_caches=False"]


@pytest.mark.parametrize("is_main", [True, False])
def test_only_the_main_process_writes_size_caches_while_planning(
    cli, monkeypatch, tmp_path, is_main
):
    from train_runs import make_dataset, write_config

    import sdtrain.launch
    import sdtrain.run.train

    seen: dict[str, bool] = {}

    def prepare(_loaded, _command, write_caches):
        seen["write_caches"] = write_caches
        raise SystemExit(0)

    monkeypatch.setattr(sdtrain.launch, "is_main_process", lambda: is_main)
    monkeypatch.setattr(sdtrain.run.train, "prepare", prepare)
    config = write_config(tmp_path / "run.toml", make_dataset(tmp_path / "data"), tmp_path / "o")
    cli(["train", "lora", str(config)])
    assert seen == {"write_caches": is_main}
