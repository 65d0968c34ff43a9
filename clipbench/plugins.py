"""Extensions that live outside clipbench: modules that register tasks, storage formats, metrics
or model backends when imported.

clipbench imports, once per process before a command runs, every module named by

* an entry point in the group ``clipbench.plugins`` of an installed package
  (``[project.entry-points."clipbench.plugins"] my_task = "my_package.my_task"``), and
* ``$CLIPBENCH_PLUGINS``, a comma-separated list of module names (for code that is not installed).
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points

from clipbench.errors import ClipbenchError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "clipbench.plugins"
ENV_VAR = "CLIPBENCH_PLUGINS"


def plugin_modules() -> list[str]:
    """Module names to import: installed entry points first, then ``$CLIPBENCH_PLUGINS``."""
    names = [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names += [n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()]
    return list(dict.fromkeys(names))


def load_plugins() -> list[str]:
    """Import every plugin module; returns their names.

    Raises:
        ClipbenchError: a plugin module cannot be imported (names it and the import error).
    """
    loaded = []
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ClipbenchError(
                f"The clipbench plugin module {name!r} could not be imported ({type(exc).__name__}: "
                f"{exc}). Check ${ENV_VAR} or the '{ENTRY_POINT_GROUP}' entry points of installed "
                "packages, and that the module is on the Python path."
            ) from exc
        log.info("loaded plugin %s", name)
        loaded.append(name)
    return loaded
