"""Recipe schema (pydantic, unknown keys are errors), TOML loading and --set overrides.

Relative paths in a recipe resolve against the folder that holds the recipe file, so a
recipe runs the same from any working directory.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploytool.errors import UserError
from deploytool.hardware import DEFAULT_THREADS

DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(Strict):
    """One model input: its name, shape (strings are dynamic axes) and dtype."""

    name: str = Field(min_length=1)
    shape: list[int | str] = Field(min_length=1)
    dtype: DType = "float32"

    @field_validator("shape")
    @classmethod
    def _positive_dims(cls, shape: list[int | str]) -> list[int | str]:
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and dim <= 0:
                raise ValueError(f"dimension {dim} must be positive (use a name such as 'batch' for a dynamic axis)")
            if axis > 0 and isinstance(dim, str) and "batch" in dim.lower():
                # samples are stacked along the first axis everywhere (data, calibration, verify, latency): a batch axis
                # elsewhere (a time-major nn.LSTM's [time, batch, features]) would be fed time steps as samples
                raise ValueError(
                    f"the batch axis '{dim}' is at position {axis} of {shape}; deploytool stacks samples along the first "
                    "axis: export a wrapper whose forward takes the batch first and transposes (e.g. a time-major "
                    "nn.LSTM: x.transpose(0, 1)), or use batch_first=True")
        return shape


class ModelConfig(Strict):
    """The model to deploy: a PyTorch model (factory, checkpoint) or an ONNX file (onnx)."""

    factory: str | None = Field(None, description="module:callable or path/to/file.py:callable building the nn.Module")
    onnx: str | None = Field(None, description="an ONNX model to start from instead of a PyTorch one: the run simplifies, "
                             "quantizes and verifies it against itself (inputs and outputs are read from the file)")
    factory_args: dict[str, Any] = Field(default_factory=dict,
                                         description="keyword arguments the factory is called with (a TOML table)")
    checkpoint: str | None = Field(None, description="state_dict as .pt/.pth (loaded weights_only) or .safetensors")
    trust_checkpoint: bool = Field(False, description="allow unpickling arbitrary objects (a full module): runs code from the file")
    inputs: list[InputSpec] = Field(default_factory=list, description="required with factory; read from the file with onnx")
    outputs: list[str] = Field(default_factory=list, description="required with factory; read from the file with onnx")

    @field_validator("factory")
    @classmethod
    def _has_callable(cls, factory: str | None) -> str | None:
        module, sep, attr = (factory or ":").rpartition(":")
        if factory is not None and (not sep or not module or not attr):
            raise ValueError(f"'{factory}' must look like 'package.module:callable' or 'path/to/file.py:callable'")
        return factory

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.factory is None) == (self.onnx is None):
            raise ValueError("give either factory (a PyTorch model) or onnx (an ONNX file), not both" if self.factory
                             else "a model needs factory (a PyTorch model) or onnx (an ONNX file)")
        if self.onnx is not None:
            given = [k for k in ("checkpoint", "factory_args", "trust_checkpoint") if getattr(self, k)]
            if given:
                raise ValueError(f"{', '.join(given)} belong(s) to a PyTorch model; an onnx model has its weights in the file")
        else:
            for key, what in (("inputs", "the name, shape and dtype of each input"), ("outputs", "the output names")):
                if not getattr(self, key):  # given but empty, or left out
                    raise ValueError(f"[model] {key}: a PyTorch model needs {what} (got [])" if key in self.model_fields_set
                                     else f"missing key '{key}' in [model] (a PyTorch model needs {what})")
        return self


class ImageConfig(Strict):
    """How images in an image folder become model inputs: decode, resize, centre-crop, scale, normalise."""

    resize: list[int] | None = Field(None, min_length=2, max_length=2, description="[height, width]")
    crop: list[int] | None = Field(None, min_length=2, max_length=2, description="centre crop [height, width]")
    color: Literal["rgb", "gray"] = "rgb"
    scale: float = Field(1 / 255, gt=0, allow_inf_nan=False, description="pixel values are multiplied by this first")
    mean: list[float] = [0.0]
    std: list[float] = [1.0]
    layout: Literal["nchw", "nhwc"] = "nchw"

    @field_validator("std")
    @classmethod
    def _nonzero(cls, std: list[float]) -> list[float]:
        if not std or any(v == 0 for v in std):
            raise ValueError("std values must be non-zero")
        return std


class DataConfig(Strict):
    calibration: str | None = Field(None, description=".npz, folder of .npz/.npy, image folder, or module:callable")
    validation: str | None = None
    image: ImageConfig | None = Field(None, description="preprocessing for image folders")
    task: Literal["classification", "embedding", "regression", "generic"] = "classification"
    labels: str = Field("labels", description="key of the labels array in validation data")


class PruneConfig(Strict):
    method: Literal["channel", "magnitude", "nm"] = "channel"
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of channels (channel) or weights (magnitude) removed")
    heads_ratio: float | None = Field(None, ge=0, lt=1, description="channel: fraction of the attention heads removed in "
                                      "every attention layer of a transformer (default: ratio; 0 keeps them all)")
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    round_to: Annotated[int, Field(ge=1)] | Literal["measured"] | None = Field(
        8, description="keep channel counts multiples of this; \"measured\" (latency budget with per-layer allocation "
        "only): each pruned layer's width chosen from its measured ONNX Runtime time at the widths around the planned one")
    iterative_steps: int = Field(1, ge=1)
    global_pruning: bool = False
    scope: Literal["global", "layer"] = Field("global", description="magnitude pruning: one threshold or one per layer")
    n: int = Field(2, ge=1, description="nm pruning: keep n of every m consecutive input weights")
    m: int = Field(4, ge=2)
    ignore: list[str] = Field([], description="layer names or glob patterns never pruned (output heads always are)")
    sensitivity: bool = Field(False, description="scan each layer alone at scan_ratios and report the table")
    scan_ratios: list[float] = [0.25, 0.5, 0.75]
    target_speedup: float | None = Field(None, gt=1, allow_inf_nan=False,
                                         description="channel: search the ratio for this speedup over the original's ONNX export")
    target_latency_ms: float | None = Field(None, gt=0, allow_inf_nan=False,
                                            description="channel: search the ratio for this ONNX Runtime latency (ms)")
    max_ratio: float = Field(0.9, gt=0, lt=1, description="the largest ratio the latency-budget search tries")
    allocation: Literal["measured", "uniform"] = Field(
        "measured", description="latency budget: one ratio for every layer, or per-layer ratios from each layer's measured "
        "ONNX Runtime time and its sensitivity")

    @property
    def budget(self) -> bool:
        """Whether the ratio is searched for a latency budget (target_speedup and/or target_latency_ms)."""
        return self.target_speedup is not None or self.target_latency_ms is not None

    @model_validator(mode="after")
    def _budget(self) -> PruneConfig:
        budget = self.budget
        if budget and self.method != "channel":
            raise ValueError("target_speedup and target_latency_ms need method = \"channel\" (only removing channels "
                             "makes ONNX Runtime faster)")
        if self.round_to == "measured" and not budget:
            raise ValueError("round_to = \"measured\" chooses widths inside a latency-budget search: set target_speedup "
                             "or target_latency_ms, or give round_to a number")
        return self

    @field_validator("scan_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        if not ratios or not all(0 < r < 1 for r in ratios):
            raise ValueError("scan ratios must be between 0 and 1 (exclusive)")
        return ratios


class DistillConfig(Strict):
    train: str | None = Field(None, description="training data; default [data] calibration")
    validation: str | None = Field(None, description="early-stopping data; default [data] validation")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)
    schedule: Literal["cosine", "constant", "onecycle"] = "cosine"
    temperature: float = Field(4.0, gt=0, allow_inf_nan=False)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label loss when labels exist")
    loss: Literal["auto", "kl", "mse", "cosine"] = "auto"
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without improvement")
    hidden_states: bool | None = Field(None, description="also match the teacher's LayerNorm outputs (default: for "
                                       "models with attention layers)")
    hidden_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the hidden-state loss")
    recalibrate_bn: bool = Field(True, description="re-estimate BatchNorm statistics on the training data before "
                                 "each validation")
    seed: int = 0
    student_factory: str | None = Field(None, description="train this model instead of the pruned one")
    student_checkpoint: str | None = None


class ExportConfig(Strict):
    opset: int = Field(18, ge=9, le=23)
    dynamic_batch: bool = True
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto"
    atol: float = Field(1e-4, ge=0, allow_inf_nan=False)
    rtol: float = Field(1e-3, ge=0, allow_inf_nan=False)


class SimplifyConfig(Strict):
    enabled: bool = True
    atol: float = Field(1e-5, ge=0, allow_inf_nan=False)
    rtol: float = Field(1e-4, ge=0, allow_inf_nan=False)


class QuantizeConfig(Strict):
    mode: Literal["static", "dynamic", "none"] = "static"
    format: Literal["qdq", "qoperator"] = "qdq"
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int | None = Field(None, ge=1, description="use at most this many calibration samples")
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool | Literal["auto"] = "auto"
    op_types: list[str] | None = None
    exclude_nodes: list[str] = []
    preprocess: bool = True
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    calibration_chunk: int = Field(8, ge=1, description="most batches per calibration chunk (also bounded by 512 MiB of activations)")
    optimize: Literal["none", "transformer"] = Field("none", description="ONNX Runtime transformer fusions before quantizing")
    num_heads: int = Field(0, ge=0, description="attention heads, for optimize = \"transformer\" (0: detect)")
    hidden_size: int = Field(0, ge=0, description="hidden size, for optimize = \"transformer\" (0: detect)")
    auto_mixed_precision: bool = Field(True, description="when the int8 model misses the targets, keep the fewest most "
                                       "sensitive nodes in float until they hold")
    speed_search: bool = Field(False, description="when int8 is slower than fp32, try cheaper variants")
    min_cosine: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False,
                                     description="target for the searches; default: [verify.gates] min_cosine or 0.99")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                            description="target for the searches; default: [verify.gates]")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="target for the searches; "
                                             "default: [verify.gates], else 0.99 for a classifier under default gates")
    min_snr_db: float | None = Field(None, allow_inf_nan=False, description="target for the searches; default: "
                                     "[verify.gates] min_snr_db or 15")
    min_speedup: float | None = Field(None, gt=0, allow_inf_nan=False, description="the speed gate the int8 model will "
                                      "face (fp32 latency / int8 latency), which mixed precision must not lose; default: "
                                      "[verify.gates] min_speedup_vs_fp32, else 1.0 under default gates")
    threads: int | None = Field(None, ge=1, description="intra-op threads the searches time at; default: [verify] threads or 2")
    calibration_batch: int | None = Field(None, ge=1, description="samples per calibration call; default: 16 when the "
                                          "export has a dynamic batch axis, else 1 (a fixed batch is always honoured)")
    search_samples: int | None = Field(None, ge=1, description="cap on the validation samples the quantize stage scores "
                                       "on; default: all of them, the samples the verify stage gates on")
    equalize: bool | Literal["auto"] = Field("auto", description="cross-layer equalization of Conv chains; auto: kept "
                                             "when the quantized model scores better with it")
    bias_correction: bool | Literal["auto"] = Field("auto", description="correct biases for the shift weight quantization "
                                                    "causes; auto: kept when the quantized model scores better with it")
    smooth_quant: bool | Literal["auto"] = Field("auto", description="SmoothQuant for activations with outlier channels "
                                                 "read by MatMul/Gemm in transformer graphs; auto: tried when outlier "
                                                 "channels are found and int8 misses the targets, kept when it scores better")
    smooth_alpha: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False, description="SmoothQuant migration "
                                       "strength; default: the best of 0.5, 0.65 and 0.8")
    dynamic_candidate: bool = Field(True, description="transformer graphs and graphs with LSTM nodes whose recipe names "
                                    "no op_types: also score ONNX Runtime's dynamic int8 (MatMuls, LSTMs) and keep it "
                                    "when it meets the targets faster or scores better")
    layer_weights: Literal["auto", "uniform"] = Field("auto", description="auto: where 7-bit weights (reduce_range) miss "
                                                      "the targets, 8-bit weights on the layers that gain most")
    unpruned: bool | None = Field(None, description="also quantize the original (unpruned, undistilled) model: an "
                                  "alternative the run verifies and may recommend; default: with a [prune] latency budget")


class GatesConfig(Strict):
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                            description="reference accuracy - candidate accuracy, in [0, 1]")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="share of samples, in [0, 1]")
    min_cosine: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False,
                                     description="mean cosine similarity to the reference outputs, in [-1, 1]")
    min_speedup: float | None = Field(None, gt=0, allow_inf_nan=False, description="reference p50 latency / candidate p50 latency")
    max_size_ratio: float | None = Field(None, gt=0, allow_inf_nan=False, description="candidate file size / reference checkpoint size")
    min_speedup_vs_fp32: float | None = Field(None, gt=0, allow_inf_nan=False,
                                              description="int8 only: fp32 ONNX p50 latency / int8 p50 latency")
    min_speedup_vs_ort_fp32: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="p50 latency of the original's plain ONNX Runtime fp32 export / "
        "candidate p50 latency; default: [prune] target_speedup when a latency budget is set")
    min_snr_db: float | None = Field(None, allow_inf_nan=False,
                                     description="signal-to-noise ratio of the outputs in dB: catches scaled outputs that cosine misses")
    atol: float | None = Field(None, ge=0, allow_inf_nan=False, description="element-wise: every element within atol or rtol * |reference|")
    rtol: float | None = Field(None, ge=0, allow_inf_nan=False)


class VerifyConfig(Strict):
    threads: int = Field(DEFAULT_THREADS, ge=1)
    batch_size: int = Field(64, ge=1, description="batch size for accuracy and error metrics")
    latency_batch: int = Field(1, ge=1, description="batch size for latency measurement")
    warmup: int = Field(10, ge=0)
    runs: int = Field(100, ge=1, description="timed calls per model, in blocks of `block` calls (at least 5 rounds)")
    block: int = Field(10, ge=1, description="timed calls per block; each round times one block per model, in shuffled order")
    max_seconds: float = Field(60.0, gt=0, allow_inf_nan=False,
                               description="bound on timing when a speed gate needs more rounds to be decided")
    default_gates: bool = Field(True, description="apply the default gates for every gate the recipe does not name")
    min_seconds: float = Field(0.0, ge=0, allow_inf_nan=False, description="keep timing until this many seconds have passed")
    throughput_batches: list[Annotated[int, Field(ge=1)]] = Field([], description="also measure throughput at these batch sizes")
    memory: bool = Field(True, description="measure each ONNX model's inference-session peak memory")
    verdict: Literal["all", "recommended"] | None = Field(
        None, description="all: every gate of every model the run makes must pass; recommended: the run passes when the "
        "model it recommends passes every gate of its own; default: recommended with a [prune] latency budget, else all")
    gates: GatesConfig = GatesConfig()


class Recipe(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    model: ModelConfig
    data: DataConfig = DataConfig()
    prune: PruneConfig | None = None
    distill: DistillConfig | None = None
    export: ExportConfig = ExportConfig()
    simplify: SimplifyConfig | None = None
    quantize: QuantizeConfig | None = None
    verify: VerifyConfig | None = None

    base_dir: Path = Field(Path("."), exclude=True, description="folder relative paths resolve against")

    @model_validator(mode="after")
    def _cross_stage_defaults(self) -> Recipe:
        """Defaults one stage takes from another's table, resolved here once, so that `--dry-run` and
        recipe.resolved.toml show what runs: the quantize stage's targets are the gates verify will apply."""
        from deploytool.gates import (
            DEFAULT_MIN_COSINE,
            DEFAULT_MIN_SNR_DB,
            DEFAULT_MIN_SPEEDUP_VS_FLOAT,
            DEFAULT_MIN_TOP1_AGREEMENT,
        )

        if self.model.onnx is not None and (self.prune is not None or self.distill is not None):
            raise ValueError(f"[{'prune' if self.prune else 'distill'}] changes a PyTorch model; [model] onnx starts from an "
                             "ONNX file (use factory and checkpoint to prune or distill)")
        budget = self.prune.target_speedup if self.prune is not None else None
        searched = self.prune is not None and self.prune.budget
        if budget is not None and self.verify is not None and self.verify.gates.min_speedup_vs_ort_fp32 is None:
            self.verify.gates.min_speedup_vs_ort_fp32 = budget  # the budget is a promise the verdict checks
        if self.verify is not None and self.verify.verdict is None:
            # a budget run ships the fastest variant that passes: its verdict is that variant's
            self.verify.verdict = "recommended" if searched else "all"
        cfg = self.quantize
        if cfg is None:
            return self
        if cfg.unpruned is None:
            cfg.unpruned = searched and cfg.mode != "none"
        gates = self.verify.gates if self.verify else GatesConfig()
        defaults = self.verify is not None and self.verify.default_gates

        def fill(key: str, value: Any) -> None:
            if getattr(cfg, key) is None and value is not None:
                setattr(cfg, key, value)

        fill("min_cosine", gates.min_cosine if gates.min_cosine is not None else DEFAULT_MIN_COSINE)
        fill("max_accuracy_drop", gates.max_accuracy_drop)
        fill("min_top1_agreement", gates.min_top1_agreement if gates.min_top1_agreement is not None else (
            DEFAULT_MIN_TOP1_AGREEMENT if defaults and self.data.task == "classification" else None))
        fill("min_snr_db", gates.min_snr_db if gates.min_snr_db is not None else DEFAULT_MIN_SNR_DB)
        fill("min_speedup", gates.min_speedup_vs_fp32 if gates.min_speedup_vs_fp32 is not None else (
            DEFAULT_MIN_SPEEDUP_VS_FLOAT if defaults else None))
        fill("threads", self.verify.threads if self.verify else DEFAULT_THREADS)
        if self.model.onnx is None:  # an ONNX file's batch axis is read from the file (stages.inspect.recipe_io)
            fill("calibration_batch", 16 if self.export.dynamic_batch else 1)
        return self

    def resolve(self, path: str | Path) -> Path:
        """A recipe path made absolute against the recipe's folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def absolute(self) -> Recipe:
        """A copy whose file paths are absolute, so it runs from any folder (the resolved recipe of a run)."""

        def fix(value: str | None) -> str | None:
            if value is None:
                return None
            target, sep, attr = value.rpartition(":")
            if sep and attr.isidentifier() and target and not self.resolve(value).exists():
                return f"{self.resolve(target)}:{attr}" if target.endswith(".py") else value  # a module stays a module
            return str(self.resolve(value))

        update: dict[str, Any] = {
            "model": self.model.model_copy(update={"factory": fix(self.model.factory), "checkpoint": fix(self.model.checkpoint),
                                                   "onnx": fix(self.model.onnx)}),
            "data": self.data.model_copy(update={"calibration": fix(self.data.calibration), "validation": fix(self.data.validation)}),
        }
        if self.distill is not None:
            update["distill"] = self.distill.model_copy(update={
                key: fix(getattr(self.distill, key)) for key in ("train", "validation", "student_factory", "student_checkpoint")
            })
        return self.model_copy(update=update)

    def to_toml(self) -> str:
        import tomli_w

        data = self.model_dump(mode="json", exclude_none=True)
        if self.model.onnx is not None:  # keys of a PyTorch model, at their defaults
            data["model"] = {k: v for k, v in data["model"].items() if k not in ("factory_args", "trust_checkpoint")}
        return tomli_w.dumps(data)


def _field_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """The location without pydantic's union-member tags ('bool', "literal['auto']") after the key."""
    model: type[BaseModel] | None = Recipe
    kept: list[int | str] = []
    for part in loc:
        if isinstance(part, int):
            kept.append(part)
            continue
        if model is None or str(part) not in model.model_fields:
            if model is None:
                continue  # below a plain field: a union tag, not a key
            kept.append(part)  # an unknown key: reported as such
            model = None
            continue
        kept.append(part)
        model = _model_of(model.model_fields[str(part)].annotation)
    return tuple(kept)


def _format_loc(loc: tuple[int | str, ...]) -> tuple[str, str | None]:
    """('quantize', 'per_chanel') -> ('[quantize]', 'per_chanel'); list indices become [i]."""
    table: list[str] = []
    for part in loc[:-1]:
        if isinstance(part, int):
            table[-1] = f"{table[-1]}[{part}]" if table else f"[{part}]"
        else:
            table.append(str(part))
    key = loc[-1] if loc else None
    where = f"[{'.'.join(table)}]" if table else "the top level"
    return where, None if key is None else str(key)


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = _model_of(field.annotation)
    return [] if model is None else [k for k in model.model_fields if k != "base_dir"]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _user_error(source: str, exc: ValidationError) -> UserError:
    messages: list[str | tuple[int | str, ...]] = []  # a text, or the location of a bad value rendered below
    hint = None
    bad: dict[tuple[int | str, ...], tuple[list[str], object]] = {}  # a union type gives one error per member
    for err in exc.errors():
        loc = _field_path(tuple(err["loc"]))
        where, key = _format_loc(loc)
        if err["type"] == "extra_forbidden":
            messages.append(f"unknown key '{key}' in {where}")
            if hint is None:
                known = _known_keys(tuple(err["loc"][:-1]))
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        elif err["type"] == "missing":
            messages.append(f"missing key '{key}' in {where}")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a check across a table's keys
            table = f"[{'.'.join(str(p) for p in loc)}]" if loc else "the recipe"
            message = err["msg"].removeprefix("Value error, ")
            messages.append(message if message.startswith(("[", "missing key")) else f"{table}: {message}")
        elif loc in bad:
            bad[loc][0].append(err["msg"])
        else:
            bad[loc] = ([err["msg"]], err.get("input"))
            messages.append(loc)

    def render(item: str | tuple[int | str, ...]) -> str:
        if isinstance(item, str):
            return item
        where, key = _format_loc(item)
        reasons, value = bad[item]
        return f"{where} {key}: {' or '.join(dict.fromkeys(reasons))} (got {value!r})"

    return UserError(f"{source}: " + "; ".join(render(m) for m in messages), hint)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'verify.gates.min_cosine=0.99' -> (['verify', 'gates', 'min_cosine'], 0.99); values are TOML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"--set {text!r}: expected TABLE.KEY=VALUE", "example: --set verify.gates.min_cosine=0.99")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: '{part}' is a value, not a table")
            node = child
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a UserError naming the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some Windows editors write one) is fine
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    data = apply_overrides(data, overrides or [])
    if "base_dir" in data:  # an internal field, not part of the recipe vocabulary
        known = ", ".join(k for k in Recipe.model_fields if k != "base_dir")
        raise UserError(f"{path}: unknown key 'base_dir' in the top level", f"known keys: {known}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _user_error(str(path), exc) from None
    recipe.base_dir = path.resolve().parent
    return recipe
