"""hubtune: safe, shareable transfer learning for Hugging Face Hub models.

Example:
    >>> from hubtune import load_recipe, run_recipe
    >>> result = run_recipe(load_recipe("recipes/quickstart.yaml"))
"""

__version__ = "0.1.0"

from hubtune.recipe import Recipe, RecipeError, load_recipe  # noqa: E402

__all__ = ["Recipe", "RecipeError", "__version__", "load_recipe", "run_recipe"]


def __getattr__(
    name: str,
):  # lazy: importing torch/transformers is slow, keep `hubtune --help` fast
    if name == "run_recipe":
        from hubtune.pipeline import run_recipe

        return run_recipe
    raise AttributeError(name)
