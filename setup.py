"""Build step only (the project's metadata is in pyproject.toml).

The data folders stay at the top level of the repository, where the platform's module convention
keeps them, and a wheel carries them inside the package as ``billing_module/_resources/<name>``:
``build_py`` copies them after the Python files. ``billing_module/resources.py`` finds them in both
layouts. This is setuptools' ordinary extension point (a ``build_py`` subclass), rather than
``data_files`` (which installs outside the package, under the environment's prefix, where the
package cannot find them reliably) or a symlink inside the package (which wheels do not carry).
The sdist carries the folders through MANIFEST.in, so a wheel built from the sdist has them too.
"""
import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_resources = runpy.run_path(str(ROOT / "billing_module" / "resources.py"))


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return   # an editable install reads the folders from the checkout itself
        target = Path(self.build_lib, "billing_module", _resources["PACKAGED_DIR"])
        for name in _resources["DATA_DIRS"]:
            dest = target / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(ROOT / name, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithData})
