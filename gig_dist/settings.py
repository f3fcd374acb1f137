"""What every config section shares: the base class and the error. The sections themselves live
with what they configure (each stage module declares its own); :mod:`gig_dist.config` assembles
them into the one schema that is validated before any work."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot run, with a message that names the key and value at fault."""


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
