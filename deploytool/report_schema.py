"""The stable keys of report.json as a typed model: what users' CI scripts may rely on. Runs and `verify` build their
reports through it, so a report that breaks the contract fails where it is made, not in a user's script. Other keys
(stage details, the quantization search, localization) are allowed beside these and carried unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Gate(_Open):
    name: str
    model: str
    value: float | None  # None: the quantity could not be measured (e.g. outputs with NaN)
    threshold: float | None
    passed: bool
    default: bool  # applied because the user named no such gate
    against: str | None = None  # the model the value compares with, where not the reference
    interval: list[float | None] | None = None  # a speed gate's confidence interval
    binding: bool = True  # False: measured and reported, but the verdict does not rest on it ([verify] verdict)


class ModelFile(_Open):
    path: str | None  # None: a model built in code with no checkpoint
    size_bytes: int | None
    sha256: str | None
    params: int | None = None
    macs: int | None = None


class StageRecord(_Open):
    name: str
    status: Literal["done", "skipped", "cached", "failed"]
    seconds: float
    error: str | None = None  # a failed stage: the error's one line, as the terminal shows it


class Report(_Open):
    name: str
    passed: bool
    gates: list[Gate]
    models: dict[str, ModelFile]
    metrics: dict[str, dict[str, Any]]
    latency: dict[str, Any] | None = None
    stages: list[StageRecord]
    environment: dict[str, Any]
    notes: list[str] = []
    latency_batch: int | None = None
    # what each stage recorded (free-form: their keys are the stages' own, documented in the README)
    export: dict[str, Any] | None = None
    simplify: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    localization: dict[str, Any] | None = None
    latency_samples_ms: dict[str, Any] | None = None
    recommended: dict[str, Any] | None = None

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed and g.binding]


def checked(report: dict[str, Any]) -> dict[str, Any]:
    """`report` (JSON-safe) after checking it against the stable keys; unchanged, so keys keep their order."""
    Report.model_validate(report)
    return report
