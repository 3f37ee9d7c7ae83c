"""The hub section of a run config (`hub:` in a recipe, `hub.key=value` overrides): whether and where the run's
model folders are pushed. Owned by this wing, as the optimizer wing owns `optim:`.
"""

from dataclasses import dataclass
from typing import ClassVar

from ..schema import ConfigError, Section, setting


@dataclass
class HubSection(Section):
    NAME: ClassVar[str] = "hub"
    push: bool = False
    model_id: str | None = None
    push_every: int = setting(0, ge=0)  # steps; 0 = only at start and end
    private: bool = True
    max_retries: int = setting(8, ge=0)  # per push, on 5xx / 429 / connection errors, with exponential backoff
    backoff_s: float = setting(2.0, ge=0)  # first retry delay (doubles each time; a server's Retry-After wins)

    def check(self) -> None:
        if self.push and not self.model_id:
            raise ConfigError("hub.push=true needs hub.model_id=org/name")
