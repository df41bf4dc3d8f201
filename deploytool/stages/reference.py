"""What `verify` compares against: an ONNX file, golden outputs, or a recipe's PyTorch model, with its data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploytool.data import Dataset
from deploytool.errors import UserError
from deploytool.runners import Runner


@dataclass
class Reference:
    runner: Runner
    dataset: Dataset
    task: str
    label: str  # how the report names it
    onnx_float: bool = False  # an ONNX file without quantized operators: the float sibling of a quantized candidate


def resolve_reference(reference: Path, data: Path | None, task: str | None, seed: int, samples: int,
                      threads: int) -> Reference:
    """The reference runner and the dataset to verify on, for an ONNX file, golden outputs or a recipe. An ONNX
    reference runs at `threads` intra-op threads, as the candidates do: it is timed against them."""
    from deploytool.data import load_dataset, random_dataset
    from deploytool.golden import GoldenRunner, is_golden
    from deploytool.runners import OrtRunner

    if not reference.exists():
        raise UserError(f"reference not found: {reference}")
    if reference.suffix == ".toml":
        from deploytool.data import data_source
        from deploytool.recipe import load_recipe
        from deploytool.runners import TorchRunner
        from deploytool.stages.load import load_model

        recipe = load_recipe(reference)
        if recipe.model.onnx is not None:  # a recipe that starts from an ONNX file: that file, with the recipe's data
            from deploytool.gates import is_quantized
            from deploytool.stages.inspect import recipe_io

            path = recipe.resolve(recipe.model.onnx)
            recipe = recipe_io(recipe)
            specs = recipe.model.inputs
            runner: Runner = OrtRunner("reference", path, threads, user_file=True)
            label, onnx_float = f"recipe {recipe.name} ({path.name})", not is_quantized(path)
        else:
            assert recipe.model.factory is not None
            checkpoint = recipe.resolve(recipe.model.checkpoint) if recipe.model.checkpoint else None
            model = load_model(recipe.model.factory, checkpoint, recipe.base_dir, recipe.model.trust_checkpoint,
                               recipe.model.factory_args)
            specs = recipe.model.inputs
            runner = TorchRunner("reference", model, [s.name for s in specs], recipe.model.outputs)
            label, onnx_float = f"recipe {recipe.name} (PyTorch)", False
        if data is not None:
            dataset = load_dataset(data, specs, recipe.data.labels, recipe.data.image)
        elif recipe.data.validation:
            dataset = data_source(recipe, recipe.data.validation)  # as a run would load it
        else:
            dataset = random_dataset(specs, samples, seed)
        return Reference(runner, dataset, task or recipe.data.task, label, onnx_float)
    if is_golden(reference):
        golden = GoldenRunner(reference)
        if data is not None:
            raise UserError("--data cannot be combined with golden outputs: they verify on their own stored inputs")
        return Reference(golden, golden.dataset, task or "generic", f"golden outputs {reference.name}")
    if reference.suffix == ".npz":
        raise UserError(f"{reference} is an .npz without deploytool golden outputs", "create them with verify --save-golden")
    from deploytool.gates import is_quantized
    from deploytool.stages.inspect import input_specs

    specs = input_specs(reference)
    onnx_runner = OrtRunner("reference", reference, threads, user_file=True)
    dataset = load_dataset(data, specs) if data else random_dataset(specs, samples, seed)
    return Reference(onnx_runner, dataset, task or "generic", str(reference), onnx_float=not is_quantized(reference))


def candidate_names(reference: Path, candidates: tuple[Path, ...] | list[Path]) -> list[str]:
    """Short, unique names for candidate files: the file stem, or the whole path where stems collide."""
    names: list[str] = []
    for path in candidates:
        name = path.stem if path.stem not in ("reference", reference.stem) else str(path)
        names.append(name if name not in names else str(path))
    return names
