"""The module as a platform installs it: a wheel built from the sdist, installed without ``-e`` into a
fresh venv, run from a directory that is not the repository.

The venv sees the system's site-packages only so that the dependencies (ahserver, sqlor, ...) need
not be downloaded again; the test first proves that ``billing_module`` itself, and its data folders,
are imported from the venv's own site-packages and not from this checkout."""
import http.cookies
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import venv
from pathlib import Path

import pytest

import billing_module
from billing_module.db.schema import load_models
from billing_module.resources import DATA_DIRS, PACKAGED_DIR

pytestmark = pytest.mark.wheel
PROJECT = Path(billing_module.__file__).resolve().parent.parent


def _run(args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{args}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, environment, a working directory outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(PROJECT)])
    wheel = next((tmp / "dist").glob("billing_module-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    bindir = env_dir / "bin"
    _run([str(bindir / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BILLING_CONFIG", "VIRTUAL_ENV")}
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    return bindir, env, workdir


def test_wheel_and_sdist_carry_the_data_folders(installed):
    bindir, env, workdir = installed
    out = _run([str(bindir / "python"), "-c",
                "import json, billing_module, site\n"
                "from billing_module.resources import resource_dir, DATA_DIRS\n"
                "print(json.dumps({'package': billing_module.__file__, 'site': site.getsitepackages(),\n"
                "                  'dirs': {n: str(resource_dir(n)) for n in DATA_DIRS}}))"],
               cwd=workdir, env=env)
    found = json.loads(out.strip().splitlines()[-1])
    site_packages = [Path(p) for p in found["site"] if Path(p).is_relative_to(bindir.parent)]
    assert site_packages, found["site"]
    package = Path(found["package"]).parent
    assert package.parent in site_packages and not package.is_relative_to(PROJECT), found["package"]
    for name in DATA_DIRS:
        folder = Path(found["dirs"][name])
        assert folder == package / PACKAGED_DIR / name, (name, folder)
        repo_files = sorted(p.relative_to(PROJECT / name) for p in (PROJECT / name).rglob("*")
                            if p.is_file() and "__pycache__" not in p.parts)
        assert repo_files and all((folder / f).is_file() for f in repo_files), name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Browser:
    """Keeps the session cookie itself: the host marks it ``Secure`` (and ``SameSite=None``), which
    a cookie jar would hold back over plain HTTP to 127.0.0.1."""

    def __init__(self):
        self.cookies = http.cookies.SimpleCookie()

    def call(self, url, data=None):
        headers = {"Cookie": "; ".join(f"{k}={m.coded_value}" for k, m in self.cookies.items())}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
                for value in r.headers.get_all("Set-Cookie") or []:
                    self.cookies.load(value)
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


def _wait_until_serving(browser, url, proc, seconds=90):
    deadline = time.time() + seconds
    while True:
        try:
            return browser.call(url)
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "server did not start"
            time.sleep(0.3)


def test_installed_serve_demo_answers_and_renders_the_admin_pages(installed, tmp_path):
    bindir, env, workdir = installed
    port, data_dir = _free_port(), tmp_path / "data"
    proc = subprocess.Popen([str(bindir / "billing-module"), "serve", "--demo", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/billing_module"
    browser = _Browser()
    try:
        status, text = _wait_until_serving(browser, f"{base}/api/health.dspy", proc)
        assert status == 200 and json.loads(text)["status"] == "ok", text
        status, _ = browser.call(f"{base}/index.ui?_webbricks_=1")
        assert status == 401
        password = (data_dir / ".admin_password").read_text().strip()
        status, text = browser.call(f"{base}/login.dspy",
                             data=urllib.parse.urlencode({"username": "admin", "password": password}).encode())
        assert status == 200, text
        status, text = browser.call(f"{base}/index.ui?_webbricks_=1")
        assert status == 200, text[:500]
        assert isinstance(json.loads(text).get("widgettype"), str), text[:500]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


def test_installed_initdb_and_ddl_cover_every_table(installed, tmp_path):
    bindir, env, workdir = installed
    tables = set(load_models())
    out = _run([str(bindir / "billing-module"), "initdb", "--data-dir", str(tmp_path / "data")], cwd=workdir, env=env)
    assert out.startswith("created: ") and tables <= set(out.strip()[len("created: "):].split(", ")), out
    for dialect in ("mysql", "sqlite"):
        ddl = _run([str(bindir / "billing-module"), "ddl", "--dialect", dialect], cwd=workdir, env=env).lower()
        created = set(re.findall(r"create table (?:if not exists )?[`\"]?(\w+)", ddl))
        missing = sorted(tables - created)
        assert not missing, (dialect, missing)
