"""YAML reading with YAML 1.2 numbers, for configs and ``--param`` values.

PyYAML implements YAML 1.1, where ``1e-3`` and ``2.5E4`` are strings (a float needs a dot and a signed
exponent there). People write coefficients like that, so :class:`Loader` also reads YAML 1.2 floats
(``1e-3``, ``1E+38``, ``.5e2``) as numbers. Everything else is PyYAML's safe loader.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_FLOAT_12 = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves YAML 1.2 exponent floats."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def compose(text: str) -> yaml.Node | None:
    return yaml.compose(text, Loader=Loader)
