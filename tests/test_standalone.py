"""The standalone server as an operator runs it: the real command, a real port, signals."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, headers=None, data=None):
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_until_serving(base, proc, seconds=60):
    """The first health reply of a server process that is starting."""
    deadline = time.time() + seconds
    while True:
        try:
            return _get(f"{base}/api/health.dspy")
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)


def test_serve_demo_answers_health_and_stops_cleanly(tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env.pop("BILLING_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "billing_module.cli", "serve", "--demo", "--port", str(port),
                             "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}/billing_module"
    try:
        status, body = _wait_until_serving(base, proc)
        assert status == 200 and body == dict(body, success=True, status="ok", db="ok")
        # the demo prints an admin key that works
        line = next(ln for ln in iter(proc.stdout.readline, "") if "demo API key" in ln)
        key = line.rsplit(" ", 1)[1].strip()
        status, body = _get(f"{base}/api/balance.dspy?customer_id=demo-acme", {"Authorization": f"Bearer {key}"})
        assert status == 200 and body["balance"] == "100.000000"
        status, body = _get(f"{base}/api/balance.dspy?customer_id=demo-acme")
        assert status == 401 and body["code"] == "unauthorized"
        # admin pages need the admin login
        status, _ = _get(f"{base}/index.ui")
        assert status == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "billing.db").exists() and (tmp_path / "billing.log").exists()
    # the same data dir serves every other command
    out = subprocess.run([sys.executable, "-m", "billing_module.cli", "reconcile", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "checked 3 customers: 0 mismatches" in out.stdout, out.stdout + out.stderr


def test_admin_login_opens_the_pages(tmp_path):
    port = _free_port()
    env = dict(os.environ, BILLING_SERVER_ADMIN_PASSWORD="s3cret-pass")
    proc = subprocess.Popen([sys.executable, "-m", "billing_module.cli", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}/billing_module"
    try:
        _wait_until_serving(base, proc)
        status, body = _get(f"{base}/login.dspy", data=b"username=admin&password=wrong")
        assert status == 401 and body["code"] == "unauthorized"
        status, body = _get(f"{base}/login.dspy", data=b"username=admin&password=s3cret-pass")
        assert status == 200 and body["user"] == "admin"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def start_demo_workers(tmp_path, workers=2):
    """``serve --demo --workers N`` on a free port, serving: (process, base URL, demo admin key)."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("BILLING_CONFIG", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "billing_module.cli", "serve", "--demo", "--workers", str(workers),
                             "--port", str(port), "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}/billing_module"
    key = None
    for ln in iter(proc.stdout.readline, ""):
        if "demo API key" in ln:
            key = ln.rsplit(" ", 1)[1].strip()
            break
    _wait_until_serving(base, proc)
    time.sleep(1)    # let the other workers bind as well
    return proc, base, key


def test_two_worker_processes_share_the_port_and_the_database(tmp_path):
    proc, base, key = start_demo_workers(tmp_path)
    try:
        for i in range(20):
            status, body = _get(f"{base}/api/recharge.dspy", {"Authorization": f"Bearer {key}",
                                                             "Content-Type": "application/json"},
                                data=json.dumps({"customer_id": "demo-acme", "amount": "1",
                                                 "request_id": f"w-{i % 10}"}).encode())
            assert status == 200, body
        status, body = _get(f"{base}/api/balance.dspy?customer_id=demo-acme", {"Authorization": f"Bearer {key}"})
        assert body["balance"] == "110.000000"     # 100 demo + 10 distinct recharges, replays not counted
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def _prepare_workdir(data_dir, results, start):
    from billing_module.config import load_config
    from billing_module.server import desc_from_config, write_host_workdir
    try:
        cfg = load_config(environ={}, overrides={"server": {"data_dir": data_dir, "log_file": ""}})
        start.wait(timeout=60)      # all at once, as workers started together do
        results.put(write_host_workdir(cfg, data_dir, desc_from_config(cfg, data_dir))["password_key"])
    except Exception as e:   # reported to the test, which fails with it
        results.put(repr(e))


def test_two_processes_preparing_one_data_dir_agree(tmp_path):
    """Two servers (or workers) starting at once on one data directory both start, with one
    password key (they raced on the wwwroot link and the secret files: one exited 1)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    for i in range(15):
        data_dir, results, start = str(tmp_path / f"d{i}"), ctx.Queue(), ctx.Barrier(3)
        os.makedirs(data_dir)
        procs = [ctx.Process(target=_prepare_workdir, args=(data_dir, results, start)) for _ in range(3)]
        for p in procs:
            p.start()
        keys = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert len(set(keys)) == 1 and "Error" not in keys[0], keys
