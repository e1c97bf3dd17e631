"""Where the module's data folders are: ``models/``, ``wwwroot/``, ``json/``, ``init/``, ``scripts/``.

In the repository (and so in an editable install) they sit beside the package, at the top level the
platform's module convention wants. A wheel cannot put folders there, so the build step in
``setup.py`` copies them into the package as ``billing_module/_resources/<name>``; a host that
installs the module with pip then finds them inside the installed package. This module is the one
place that knows both layouts; nothing else computes these paths.

Standard library only: ``setup.py`` reads ``DATA_DIRS`` from this file before anything is installed.
"""
import functools
from importlib.resources import files
from pathlib import Path

DATA_DIRS = ("models", "wwwroot", "json", "init", "scripts")
PACKAGED_DIR = "_resources"   # inside the package, in a wheel


@functools.cache
def resource_dir(name: str) -> Path:
    """The folder ``name`` (one of ``DATA_DIRS``) as a real directory: ahserver serves ``wwwroot/``
    from the file system, so a zipped install is not supported."""
    if name not in DATA_DIRS:
        raise ValueError(f"unknown resource folder {name!r}; expected one of {DATA_DIRS}")
    packaged = files(__package__ or "billing_module").joinpath(PACKAGED_DIR).joinpath(name)
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    # a source checkout: the folder beside the package, and only when it is the project's own
    # root (a site-packages directory may hold an unrelated top-level "models" or "scripts")
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / name).is_dir():
        return checkout / name
    raise FileNotFoundError(f"billing_module: the {name}/ folder is missing: neither {packaged} (an installed "
                            f"wheel) nor {checkout / name} (a source checkout) exists; reinstall the package")


def resource_path(name: str, *parts: str) -> Path:
    """A file or folder inside one of the data folders, e.g. ``resource_path("init", "data.json")``."""
    return resource_dir(name).joinpath(*parts)
