"""The unit of data every task produces, and the error a user's bad data raises."""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
    """Data that cannot be used (missing file, missing field, empty split, unknown task); one
    line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and its reference response (the target; "" when the data has prompts only)."""

    prompt: str
    response: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response}
