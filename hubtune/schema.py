"""The strict base of every recipe section (and of each method's configuration)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """Unknown keys are errors; assignments are validated; no infinite or NaN numbers.

    allow_inf_nan=False: every float field refuses inf, -inf and nan (YAML .inf/.nan, or
    "inf" from an override). An infinite ε or clipping bound passes a `gt=0` check and then
    trains with no privacy at all, or fails much later with a misleading message.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
