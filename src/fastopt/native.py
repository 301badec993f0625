"""Finding the package's compiled extensions: ``fastopt._c`` and ``fastopt._tables``.

Both are built by the top-level CMakeLists.txt. Where an extension is looked
for, first hit wins:

1. inside the installed package (what ``pip install .`` builds);
2. the directory in the environment variable ``FASTOPT_C_BUILD_DIR``;
3. ``build/dev`` of the source checkout this file lives in, the output of
   ``cmake -S . -B build/dev -DPython_EXECUTABLE=$(which python) && cmake --build build/dev``
   (for working from a checkout with ``PYTHONPATH=src``).
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["load_extension"]


def _checkout_build_dir() -> Path:
    # src/fastopt/native.py -> the checkout root
    return Path(__file__).resolve().parents[2] / "build" / "dev"


def _import_from(directory: str, name: str) -> Optional[ModuleType]:
    """Import ``fastopt.<name>`` from a build directory; None when it is not there."""
    found = sorted(glob.glob(os.path.join(directory, f"{name}.*.so")) + glob.glob(os.path.join(directory, f"{name}.*.pyd")))
    if not found:
        return None
    spec = importlib.util.spec_from_file_location(f"fastopt.{name}", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[f"fastopt.{name}"] = module
    return module


def load_extension(name: str) -> ModuleType:
    """The extension ``fastopt.<name>`` (``"_c"``, ``"_tables"``), or ImportError
    listing where it was looked for."""
    tried = []
    try:
        return importlib.import_module(f"fastopt.{name}")
    except ImportError as exc:
        tried.append(f"fastopt.{name} ({exc})")
    for directory in (os.environ.get("FASTOPT_C_BUILD_DIR"), str(_checkout_build_dir())):
        if not directory:
            continue
        module = _import_from(directory, name)
        if module is not None:
            return module
        tried.append(f"{directory} (no {name} extension built there)")
    raise ImportError(f"the compiled extension fastopt.{name} is missing; install the package with pip (it builds "
                      "csrc/), or build it with cmake into build/dev or $FASTOPT_C_BUILD_DIR. Looked in: "
                      + "; ".join(tried))
