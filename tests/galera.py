"""A throw-away 3-node MariaDB Galera cluster on this machine, for the cluster tests.

Each node is one ``mariadbd`` with its own datadir, socket and free TCP ports (client, group
communication, IST, SST) in one temporary folder; the first node bootstraps the cluster
(``--wsrep-new-cluster``), the others join it by rsync SST. Every process runs as ``nobody``:
rsync SST runs its daemon as the server's user, and a root-run server would leave files in a
joiner's datadir that the daemon could not replace (issue 16).

    python tests/galera.py run -- python -m pytest tests/test_galera.py   # start, run, stop
    python tests/galera.py start --dir /tmp/g   # prints BILLING_TEST_GALERA=...; `stop --dir /tmp/g`

``run`` stops every node it started, whatever the command's outcome (and on SIGTERM / SIGINT).
The cluster is kept small (64 MB buffer pool, 32 MB gcache): the machine is shared.
"""
import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pymysql

PROVIDER_CANDIDATES = ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so")
NODE_COUNT = 3
START_TIMEOUT_SECONDS = 90
# how long a cluster must stay whole after a failover before the next test (more than the nodes'
# evs.inactive_timeout of 4 s: an eviction still pending shows within it)
SETTLE_SECONDS = 6
RUN_AS = "nobody"
STATE_FILE = "cluster.json"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nothing listens on now (the kernel's choice of ephemeral
    ports, held open together so none repeats)."""
    holders, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            holders.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in holders:
            s.close()
    return ports


def provider_path() -> str:
    for path in PROVIDER_CANDIDATES:
        if os.path.exists(path):
            return path
    raise RuntimeError("libgalera_smm.so not found: install galera-4")


class Node:
    def __init__(self, index: int, root: str, ports: list[int]):
        self.index = index
        self.dir = os.path.join(root, f"node{index}")
        self.datadir = os.path.join(self.dir, "data")
        self.port, self.gcomm_port, self.ist_port, self.sst_port = ports
        self.process = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, cluster_address: str, provider: str) -> str:
        path = os.path.join(self.dir, "my.cnf")
        options = (f"base_host=127.0.0.1;base_port={self.gcomm_port};"
                   f"ist.recv_addr=127.0.0.1:{self.ist_port};gcache.size=32M;"
                   "evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S;evs.inactive_check_period=PT0.5S;"
                   "evs.keepalive_period=PT0.5S")
        settings = {
            "user": RUN_AS, "datadir": self.datadir, "socket": os.path.join(self.dir, "mysqld.sock"),
            "pid-file": os.path.join(self.dir, "mysqld.pid"), "log-error": os.path.join(self.dir, "error.log"),
            "port": self.port, "bind-address": "127.0.0.1", "skip-name-resolve": "ON",
            "innodb_buffer_pool_size": "64M", "innodb_log_file_size": "16M",
            "innodb_flush_log_at_trx_commit": 2, "performance_schema": "OFF", "max_connections": 300,
            "binlog_format": "ROW", "default_storage_engine": "InnoDB", "innodb_autoinc_lock_mode": 2,
            "character-set-server": "utf8mb4", "collation-server": "utf8mb4_unicode_ci",
            "wsrep_on": "ON", "wsrep_provider": provider, "wsrep_cluster_name": "billing_test",
            "wsrep_cluster_address": cluster_address, "wsrep_node_address": f"127.0.0.1:{self.gcomm_port}",
            "wsrep_node_name": f"node{self.index}", "wsrep_provider_options": f'"{options}"',
            "wsrep_sst_method": "rsync", "wsrep_sst_receive_address": f"127.0.0.1:{self.sst_port}",
            "wsrep_slave_threads": 2,
        }
        with open(path, "w") as f:
            f.write("[mariadbd]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        return path

    def start(self, bootstrap: bool) -> None:
        args = ["/usr/sbin/mariadbd", f"--defaults-file={os.path.join(self.dir, 'my.cnf')}"]
        if bootstrap:
            args.append("--wsrep-new-cluster")
        log = open(os.path.join(self.dir, "stdout.log"), "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self) -> None:
        """SIGKILL: the node dies as in a power cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the node answers nothing and breaks no connection (a hung process, or a
        network partition that drops every packet); the kernel still accepts new connections."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, timeout_seconds: float = 30) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.resume()                 # a paused node would not see SIGTERM before SIGKILL
            self.process.terminate()
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def state(self) -> str:
        """wsrep_local_state_comment ('Synced', 'Joining', ...), or '' when it does not answer."""
        try:
            conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=2)
        except pymysql.err.MySQLError:
            return ""
        try:
            with conn.cursor() as c:
                c.execute("show status like 'wsrep_local_state_comment'")
                row = c.fetchone()
                return row[1] if row else ""
        finally:
            conn.close()

    def wait_synced(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"node{self.index} exited ({self.process.returncode}); see {self.dir}/error.log")
            if self.state() == "Synced":
                return
            time.sleep(0.3)
        raise RuntimeError(f"node{self.index} not Synced after {timeout_seconds} s; see {self.dir}/error.log")


def wait_whole(addresses: list[str], timeout_seconds: float = START_TIMEOUT_SECONDS,
               settled_seconds: float = 0.0) -> None:
    """Wait until every node (``host:port``) is Synced in the primary component and ready for
    statements, and has stayed so for ``settled_seconds``. A node that was paused or killed is
    Synced again before the cluster has settled: a moment later the others can still lose and
    re-form the primary component (a slow machine's stalls pass the short suspect timeouts these
    nodes run with), so the failover helpers wait for a settled cluster and every test for a
    whole one."""
    deadline = time.monotonic() + timeout_seconds
    whole_since = None
    while True:
        states = {address: _readiness(address) for address in addresses}
        if all(state == ("Synced", "Primary", "ON") for state in states.values()):
            whole_since = whole_since or time.monotonic()
            if time.monotonic() - whole_since >= settled_seconds:
                return
        else:
            whole_since = None
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Galera cluster is not settled after {timeout_seconds} s: {states}")
        time.sleep(0.3)


def _readiness(address: str) -> tuple[str, ...]:
    """(local state, cluster status, ready) of one node, or () when it does not answer."""
    host, _, port = address.rpartition(":")
    try:
        conn = pymysql.connect(host=host, port=int(port), user="root", connect_timeout=2)
    except pymysql.err.MySQLError:
        return ()
    try:
        with conn.cursor() as c:
            c.execute("show status where variable_name in "
                      "('wsrep_local_state_comment', 'wsrep_cluster_status', 'wsrep_ready')")
            status = dict(c.fetchall())
        return (status.get("wsrep_local_state_comment", ""), status.get("wsrep_cluster_status", ""),
                status.get("wsrep_ready", ""))
    except pymysql.err.MySQLError:
        return ()
    finally:
        conn.close()


class _Adopted:
    """A node process another Python process started: just enough of Popen to kill it."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        """None while it runs; a killed child of another process stays a zombie until that
        process reaps it, and counts as ended."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("Z", "X", "gone"):
            self.returncode = -9
            return self.returncode
        return None

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    terminate = kill

    def wait(self, timeout=None) -> int:
        deadline = time.monotonic() + (timeout or 30)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("mariadbd", timeout)
            time.sleep(0.05)
        return self.returncode


class GaleraCluster:
    """``with GaleraCluster() as cluster:`` three Synced nodes; ``cluster.addresses`` are their
    ``host:port``; ``kill(i)`` / ``restart(i)`` and ``pause(i)`` / ``resume(i)`` for failover
    tests. Leaving the block stops them."""

    def __init__(self, root: str | None = None, node_count: int = NODE_COUNT):
        self.own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="billing-galera-")
        ports = free_ports(4 * node_count)
        self.nodes = [Node(i + 1, self.root, ports[4 * i:4 * i + 4]) for i in range(node_count)]
        self.cluster_address = "gcomm://" + ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self.nodes)

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def start(self) -> None:
        try:
            self._prepare()
            for i, node in enumerate(self.nodes):
                node.start(bootstrap=(i == 0))
                self.save()
                node.wait_synced()
        except BaseException:
            self.stop()
            raise

    def _prepare(self) -> None:
        nobody = pwd.getpwnam(RUN_AS)
        provider = provider_path()
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o755)
        for node in self.nodes:
            os.makedirs(node.datadir, exist_ok=True)
            node.write_config(self.cluster_address, provider)
            for path in (node.dir, node.datadir):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        first = self.nodes[0]
        subprocess.run(["mariadb-install-db", f"--defaults-file={os.path.join(first.dir, 'my.cnf')}",
                        "--auth-root-authentication-method=normal", "--skip-test-db", "--wsrep-on=OFF"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def pause(self, index: int) -> None:
        self.nodes[index].pause()

    def resume(self, index: int) -> None:
        """SIGCONT to a paused node, and wait until it has rejoined (it was evicted meanwhile)."""
        self.nodes[index].resume()
        self.nodes[index].wait_synced()
        wait_whole(self.addresses, settled_seconds=SETTLE_SECONDS)

    def restart(self, index: int) -> None:
        """Start a node that died and wait until it has rejoined (IST or SST) and is Synced."""
        node = self.nodes[index]
        node.kill()
        node.start(bootstrap=False)
        node.wait_synced()
        self.save()
        wait_whole(self.addresses, settled_seconds=SETTLE_SECONDS)

    def stop(self) -> None:
        self._adopt_restarted()
        for node in reversed(self.nodes):
            node.stop()
        if self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _adopt_restarted(self) -> None:
        """A node a test restarted (after ``attach``) runs under a process id this object did
        not start: take it from the state file so that ``stop`` stops it too."""
        try:
            with open(os.path.join(self.root, STATE_FILE)) as f:
                saved = json.load(f)["pids"]
        except (OSError, ValueError, KeyError):
            return
        for node, pid in zip(self.nodes, saved, strict=False):
            if pid is not None and (node.process is None or node.process.pid != pid):
                if node.process is not None and node.process.poll() is None:
                    node.stop()
                node.process = _Adopted(pid)

    def save(self) -> None:
        state = {"pids": [n.process.pid if n.process else None for n in self.nodes], "addresses": self.addresses,
                 "ports": [[n.port, n.gcomm_port, n.ist_port, n.sst_port] for n in self.nodes]}
        with open(os.path.join(self.root, STATE_FILE), "w") as f:
            json.dump(state, f)

    @classmethod
    def attach(cls, root: str) -> "GaleraCluster":
        """The cluster a ``run`` or ``start`` left in ``root``, to kill and restart its nodes
        (the tests do; stopping it stays with whoever started it)."""
        with open(os.path.join(root, STATE_FILE)) as f:
            state = json.load(f)
        cluster = cls.__new__(cls)
        cluster.own_root, cluster.root = False, root
        cluster.nodes = [Node(i + 1, root, ports) for i, ports in enumerate(state["ports"])]
        cluster.cluster_address = "gcomm://" + ",".join(f"127.0.0.1:{n.gcomm_port}" for n in cluster.nodes)
        for node, pid in zip(cluster.nodes, state["pids"], strict=False):
            node.process = _Adopted(pid) if pid is not None else None
        return cluster

    def __enter__(self) -> "GaleraCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def test_env(cluster: GaleraCluster) -> dict[str, str]:
    return {"BILLING_TEST_GALERA": ",".join(cluster.addresses), "BILLING_TEST_GALERA_DIR": cluster.root}


def stop_saved(root: str) -> None:
    """Stop the nodes a ``start`` left running in ``root`` (by their recorded process ids)."""
    with open(os.path.join(root, STATE_FILE)) as f:
        pids = [pid for pid in json.load(f)["pids"] if pid is not None]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)      # a paused node (a test's SIGSTOP) handles SIGTERM only then
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 30
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(root, ignore_errors=True)


def _raise_on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "start", "stop"))
    parser.add_argument("--dir", help="the cluster's folder (start: created if missing; stop: required)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1:]
    if args.action == "stop":
        stop_saved(args.dir)
        return 0
    signal.signal(signal.SIGTERM, _raise_on_signal)
    started = time.monotonic()
    cluster = GaleraCluster(root=args.dir and os.path.abspath(args.dir))
    cluster.start()
    print(f"galera: {NODE_COUNT} nodes Synced in {time.monotonic() - started:.1f} s at "
          f"{','.join(cluster.addresses)} ({cluster.root})", file=sys.stderr, flush=True)
    if args.action == "start":
        print("\n".join(f"export {k}={v}" for k, v in test_env(cluster).items()))
        return 0
    try:
        return subprocess.call(args.command, env=dict(os.environ, **test_env(cluster)))
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
