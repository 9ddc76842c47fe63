"""Recipe layer: pydantic models, YAML loading, key=value overrides, Python recipe classes."""

from hvdkit.recipe._load import LoadedRecipe, apply_override, load_recipe, validate
from hvdkit.recipe._model import FRAMEWORKS, Recipe
from hvdkit.recipe._python import PythonRecipe

__all__ = ["FRAMEWORKS", "LoadedRecipe", "PythonRecipe", "Recipe", "apply_override", "load_recipe", "validate"]
