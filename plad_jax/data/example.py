"""The unit of data every task produces, and the error a user's bad data raises."""

from __future__ import annotations

import dataclasses

from plad_jax.errors import DataError  # noqa: F401 (re-exported)


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and its reference response (the target; "" when the data has prompts only)."""

    prompt: str
    response: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response}
