"""The pipeline's loop, run on fake stages: order, skipping, stage records, caching, error wrapping, followers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploytool.cache import StageCache
from deploytool.context import RunContext
from deploytool.errors import StageError, UserError
from deploytool.pipeline import STAGES, Stage, run_stages
from deploytool.recipe import Recipe

RECIPE = Recipe.model_validate({"name": "fake", "model": {"factory": "m:f", "inputs": [{"name": "x", "shape": ["batch", 2]}],
                                                          "outputs": ["y"]}})


def _stages(calls: list[str]) -> tuple[Stage, ...]:
    def step(name: str) -> Stage:
        return Stage(name, lambda ctx: calls.append(name), follower=name == "a")

    return (step("a"), Stage("b", lambda ctx: calls.append("b"), lambda recipe: False), step("c"))


def test_stages_run_in_table_order_and_disabled_ones_are_recorded_as_skipped(tmp_path: Path) -> None:
    calls: list[str] = []
    ctx = RunContext(RECIPE, tmp_path)
    run_stages(ctx, _stages(calls))
    assert calls == ["a", "c"]
    assert [(s["name"], s["status"]) for s in ctx.stages] == [("a", "done"), ("b", "skipped"), ("c", "done")]
    assert all(isinstance(s["seconds"], float) and s["seconds"] >= 0 for s in ctx.stages)


def test_a_follower_runs_only_its_stages_and_records_nothing() -> None:
    calls: list[str] = []
    ctx = RunContext(RECIPE, None)
    run_stages(ctx, _stages(calls))
    assert calls == ["a"] and ctx.stages == []


def test_an_unexpected_exception_becomes_a_stage_error_naming_the_stage(tmp_path: Path) -> None:
    def broken(ctx: RunContext) -> None:
        raise ValueError("bad shape\nsecond line")

    ctx = RunContext(RECIPE, tmp_path)
    with pytest.raises(StageError, match="^boom stage failed: ValueError: bad shape$") as err:
        run_stages(ctx, (Stage("boom", broken), Stage("never", lambda ctx: pytest.fail("ran after a failure"))))
    assert err.value.exit_code == 3 and err.value.hint == "the traceback is in run.log"
    assert ctx.stages == [{"name": "boom", "status": "failed", "seconds": ctx.stages[0]["seconds"],
                           "error": "boom stage failed: ValueError: bad shape"}]  # why, for a CI job reading report.json


def test_a_user_error_passes_through_unchanged(tmp_path: Path) -> None:
    def refuses(ctx: RunContext) -> None:
        raise UserError("data does not match the model")

    with pytest.raises(UserError, match="^data does not match the model$"):
        run_stages(RunContext(RECIPE, tmp_path), (Stage("load", refuses),))


def test_cached_outputs_are_restored_and_the_stage_marked_cached(tmp_path: Path) -> None:
    computed: list[int] = []

    def produce(ctx: RunContext) -> None:
        out = ctx.folder / "artifact.bin"

        def compute() -> dict[str, object]:
            computed.append(1)
            out.write_bytes(b"payload")
            return {"size": 7}

        ctx.details["produce"] = ctx.cached({"setting": 1}, {"input": "abc"}, [out], compute)

    cache = StageCache(tmp_path / ".cache")
    first = RunContext(RECIPE, tmp_path / "one", cache=cache)
    first.folder.mkdir()
    run_stages(first, (Stage("produce", produce),))
    second = RunContext(RECIPE, tmp_path / "two", cache=cache)
    second.folder.mkdir()
    run_stages(second, (Stage("produce", produce),))
    assert computed == [1]
    assert (second.folder / "artifact.bin").read_bytes() == b"payload"
    assert second.details["produce"] == {"size": 7} and second.stages[0]["status"] == "cached"
    entry = next((tmp_path / ".cache" / "produce").iterdir())
    assert json.loads((entry / "record.json").read_text()) == {"size": 7}


def test_a_changed_config_misses_the_cache(tmp_path: Path) -> None:
    computed: list[int] = []

    def stage_with(setting: int) -> Stage:
        def produce(ctx: RunContext) -> None:
            out = ctx.folder / "artifact.bin"

            def compute() -> dict[str, object]:
                computed.append(1)
                out.write_bytes(b"x")
                return {}

            ctx.cached({"setting": setting}, {}, [out], compute)

        return Stage("produce", produce)

    cache = StageCache(tmp_path / ".cache")
    for setting in (1, 1, 2):
        ctx = RunContext(RECIPE, tmp_path / "run", cache=cache)
        ctx.folder.mkdir(exist_ok=True)
        run_stages(ctx, (stage_with(setting),))
    assert len(computed) == 2


def test_the_stage_table_is_the_documented_order() -> None:
    assert [s.name for s in STAGES] == ["load", "prune", "distill", "export", "simplify", "quantize", "verify"]
    assert [s.name for s in STAGES if s.follower] == ["load", "prune", "distill"]  # what a torchrun follower takes part in
