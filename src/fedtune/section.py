"""The base of every config section: a frozen pydantic model that refuses unknown keys.

Each package owns the section it reads (`aggregate.settings.ServerConfig`, `privacy.settings.PrivacyConfig`,
`transport.settings.DeployConfig`, ...), so no package below `fedtune.config` imports the whole `Config`;
`fedtune.config` assembles the sections and checks the rules that span several of them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
