"""What every config section shares: the base class and the error. The sections themselves live
with what they configure (each stage module declares its own); :mod:`gig_dist.config` assembles
them into the one schema that is validated before any work."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class ConfigError(ValueError):
    """A config that cannot run, with a message that names the key and value at fault."""


def _numeric(annotation: Any) -> bool:
    """Whether a field takes a number (int or float, maybe optional) and not a boolean."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        return bool not in members and any(member in (int, float) for member in members)
    return False


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen, NaN and infinity are refused
    for every float, and a boolean is never read as a number (``true`` would be 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and _numeric(field.annotation):
                    raise ValueError(f"{name} = {str(data[name]).lower()}: a number is expected, not a boolean")
        return data
