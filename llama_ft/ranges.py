"""Option types with their valid range, for the ``LlamaFineTuner`` and ``CNNDailyMailDataModule`` signatures.

jsonargparse checks ``Annotated`` constraints when it parses a command line or recipe, so an out-of-range value is
refused before anything is loaded, and the parsed value stays a plain ``int``/``float`` (checkpoints hold plain
values, readable with ``weights_only=True``). A module using them in a signature must not use
``from __future__ import annotations``: jsonargparse would resolve the string annotations without their constraints.
"""

from typing import Annotated

from annotated_types import Ge, Gt, Interval

PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Interval(ge=0, le=1)]
OpenFraction = Annotated[float, Interval(ge=0, lt=1)]  # an AdamW beta
