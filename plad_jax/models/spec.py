"""The row type of a family's HF weight table."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor and where it lives in our params.

    hf_name: the safetensors key; path: our parameter path (attribute names and list indices);
    transpose: HF stores it `[out, in]`, we store `[in, out]`.
    """

    hf_name: str
    path: tuple
    transpose: bool = False
