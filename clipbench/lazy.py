"""Modules imported on first use, so that commands which never touch them start without them.

``from clipbench.lazy import pandas as pd`` gives a stand-in whose first attribute access
(``pd.DataFrame``) imports pandas (about a second, with pyarrow, on a loaded machine); `clipbench
--help`, `clipbench datasets` and the argument parsers of `report` and `compare` load modules that
use pandas only inside functions they never call. Annotations stay strings (``from __future__
import annotations``), so naming ``pd.DataFrame`` in one imports nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["LazyModule", "pandas"]


class LazyModule:
    """A module by name, imported when one of its attributes is first read (then cached in
    :data:`sys.modules` as any import is; later reads cost one dictionary lookup)."""

    def __init__(self, name: str):
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._module(), attribute)

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


pandas = LazyModule("pandas")
