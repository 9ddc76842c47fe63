"""Loading recipes: YAML files, Python recipe classes, and ``key=value`` overrides."""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hvdkit.errors import RecipeError
from hvdkit.recipe._model import Recipe
from hvdkit.recipe._python import PythonRecipe


@dataclass
class LoadedRecipe:
    recipe: Recipe
    source: Path
    python: PythonRecipe | None = None  # the instance, for Python recipes


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), framework: str | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe. Every failure is one :class:`RecipeError` line."""
    spec = str(path)
    # "recipes/x.py:MyRecipe" picks one class out of a Python recipe file
    file_part, class_name = spec.rsplit(":", 1) if ".py:" in spec else (spec, "")
    source = Path(file_part)
    if not source.is_file():
        raise RecipeError(f"recipe file {source} not found", fix="pass a path to a .yaml recipe or a .py recipe (see recipes/)")
    py_obj = None
    if source.suffix == ".py":
        py_obj = _load_python(source, class_name or None)
        raw = dict(py_obj.config)
        raw.setdefault("name", source.stem)
        raw["python"] = f"{source}:{type(py_obj).__name__}"
    elif source.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(source.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"recipe {source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}", fix="fix the YAML syntax") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe {source} must be a YAML mapping, got {type(raw).__name__}", fix="start the file with `name: ...`")
        raw.setdefault("name", source.stem)
    else:
        raise RecipeError(f"recipe {source} has an unknown extension {source.suffix!r}", fix="use .yaml, .yml or .py")

    for item in overrides:
        apply_override(raw, item)
    if framework is not None:
        raw["framework"] = framework
    return LoadedRecipe(recipe=validate(raw, str(source)), source=source, python=py_obj)


def validate(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(recipe)"
        got = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            valid = ", ".join(parent.model_fields) if parent else "?"
            raise RecipeError(f"{where}: unknown field {field!r}", fix=f"valid fields here: {valid}") from None
        if not err["loc"] and err["type"] == "value_error":
            # A rule across fields (Recipe's own validators): its message names the values and the fix.
            problem, _, fix = msg.removeprefix("Value error, ").partition(" — fix: ")
            raise RecipeError(f"{where}: {problem}", fix=fix or "see the recipe reference in the README") from None
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RecipeError(f"{where}: {field}: {msg} (got {got!r}){more}", fix=f"set a valid {field} in the recipe or with {field}=VALUE") from None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b=value`` to ``raw`` in place; the value is parsed as YAML (so 0.1, true, [64,64] work)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is not key=value", fix="write overrides like optimizer.lr=0.1")
    parts = key.strip().split(".")
    model: type[BaseModel] | None = Recipe
    node = raw
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            valid = ", ".join(model.model_fields) if model else "(none: this field has no sub-fields)"
            raise RecipeError(f"unknown override key {key!r} (no field {part!r})", fix=f"valid keys at {'.'.join(parts[:i]) or 'top level'}: {valid}")
        if i == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a mapping", fix="override a leaf field")
            model = _model_at(tuple(parts[: i + 1]))


def _load_python(source: Path, class_name: str | None) -> PythonRecipe:
    mod_name = f"hvdkit_recipe_{source.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, source)
    if spec is None or spec.loader is None:
        raise RecipeError(f"cannot import Python recipe {source}", fix="check the file is a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report it as a recipe problem, in one line
        raise RecipeError(f"Python recipe {source} failed to import: {type(exc).__name__}: {exc}", fix="fix the recipe module") from None
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, PythonRecipe) and c is not PythonRecipe and c.__module__ == mod_name]
    if class_name:
        classes = [c for c in classes if c.__name__ == class_name]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise RecipeError(f"Python recipe {source} must define exactly one PythonRecipe subclass{' named ' + class_name if class_name else ''} (found: {found})",
                          fix="subclass hvdkit.recipe.PythonRecipe, or pass FILE.py:ClassName")
    return classes[0]()
