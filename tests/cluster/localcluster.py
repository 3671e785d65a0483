"""A real two-node Ray cluster on loopback addresses, started from the commands the docs give.

The cluster commands live in two places that must not drift: the fenced block after
``<!-- granet:cluster-commands -->`` in README.md ("On a cluster") and the header of
ray_cluster.yaml between ``# granet:cluster-commands begin`` and ``end``. The node start commands
are the yaml's ``head_start_ray_commands`` / ``worker_start_ray_commands``. :class:`LocalCluster`
runs those very commands with local values:

* ``ray up ray_cluster.yaml`` is replaced by the yaml's head and worker start commands (without
  ``ray stop``: on a cloud node it clears a previous Ray, here it would kill every Ray process on
  the machine);
* ``ray dashboard ray_cluster.yaml`` (an SSH port forward) is skipped: the dashboard already
  listens on 127.0.0.1 here;
* values, never flags, are substituted: the ports (free ports instead of 6379 / 8265 / 8076 /
  5000), the head's private IP (the head's loopback address), ``/mnt/shared`` (a temp dir) and
  the image's checkout ``/home/ray/granet`` (this repository);
* ``ray start`` loses ``--autoscaling-config`` (the launcher writes that file; no autoscaler
  here) and gains the flags two nodes on one machine need: their own ``--temp-dir``,
  ``--num-cpus``, ``--node-ip-address`` (:data:`NODE_IPS`) and free ports for everything with
  a fixed default (:data:`LOCAL_ONLY_FLAGS`).

Isolation: HOME is a temp dir (the token goes to ``$HOME/.ray/auth_token``, never the user's),
every process started carries :data:`MARK_ENV` in its environment, and :meth:`LocalCluster.stop`
stops exactly the processes that carry this cluster's mark, by PID (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CLUSTER_YAML = REPO / "ray_cluster.yaml"

MARK_ENV = "GRANET_LOCAL_CLUSTER"
README_MARKER = "<!-- granet:cluster-commands -->"
YAML_BEGIN = "# granet:cluster-commands begin"
YAML_END = "# granet:cluster-commands end"
# How the yaml's head command finds its private IP (replaced by NODE_IPS['head'] here).
PRIVATE_IP_EXPR = "$(hostname -I | cut -d' ' -f1)"
IMAGE_CHECKOUT = "/home/ray/granet"  # the Dockerfile's WORKDIR (this repository in the image)
SHARED = "/mnt/shared"  # the yaml's shared-storage mount point
# Cloud ports of the yaml -> names of the free local ports that replace them.
PORTS = {"6379": "gcs", "8265": "dashboard", "5000": "mlflow"}
# Flags only a local simulation needs (two nodes, one machine), added to the yaml's `ray start`.
LOCAL_ONLY_FLAGS = (
    "--temp-dir", "--num-cpus", "--node-ip-address", "--node-manager-port",
    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
    "--metrics-export-port", "--ray-client-server-port",
)
DROPPED_FLAGS = ("--autoscaling-config",)
# Each node on its own loopback address: Ray replaces 127.0.0.1 (only) by the machine's routable
# IP, and this machine's traffic must stay on loopback. Distinct IPs also tell the nodes apart.
NODE_IPS = {"head": "127.0.0.2", "worker": "127.0.0.3"}


# ------------------------------------------------------------------ the documented commands
def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    cur = ""
    for line in lines:
        line = line.rstrip()
        if line.endswith("\\"):
            cur += line[:-1].strip() + " "
            continue
        cur += line.strip()
        if cur and not cur.startswith("#"):
            out.append(cur)
        cur = ""
    return out


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README's marked ``bash`` block (continuations joined, no comments)."""
    text = README.read_text() if text is None else text
    _, sep, rest = text.partition(README_MARKER)
    if not sep:
        raise AssertionError(f"README.md has no {README_MARKER} block")
    m = re.search(r"```bash\n(.*?)```", rest, re.S)
    if not m or rest[: m.start()].strip():
        raise AssertionError(f"{README_MARKER} must be followed directly by a ```bash block")
    return _join_continuations(m.group(1).splitlines())


def yaml_header_commands(text: str | None = None) -> list[str]:
    """The commands between the yaml header's begin/end markers (``# `` stripped)."""
    text = CLUSTER_YAML.read_text() if text is None else text
    lines = text.splitlines()
    try:
        i, j = lines.index(YAML_BEGIN), lines.index(YAML_END)
    except ValueError:
        raise AssertionError(f"ray_cluster.yaml needs '{YAML_BEGIN}' and '{YAML_END}'") from None
    body = []
    for line in lines[i + 1 : j]:
        if not line.startswith("#"):
            raise AssertionError(f"ray_cluster.yaml header line is not a comment: {line!r}")
        body.append(line[2:] if line.startswith("# ") else line[1:])
    return _join_continuations(body)


@dataclass
class StartCommand:
    """One yaml start command, split into its ``&&`` parts."""

    env: dict[str, str] = field(default_factory=dict)  # export K=V (unexpanded values)
    steps: list[list[str]] = field(default_factory=list)  # other parts, argv (unexpanded)

    def ray_start(self) -> list[str]:
        found = [s for s in self.steps if s[:2] == ["ray", "start"]]
        if len(found) != 1:
            raise AssertionError(f"expected one `ray start` in {self.steps}")
        return found[0]


def parse_start_commands(node_type: str, cfg: dict[str, Any] | None = None) -> StartCommand:
    """``head`` / ``worker`` start commands of the yaml; ``ray stop`` items are left out."""
    cfg = yaml.safe_load(CLUSTER_YAML.read_text()) if cfg is None else cfg
    items = cfg[f"{node_type}_start_ray_commands"]
    out = StartCommand()
    for item in items:
        if item.strip() == "ray stop":
            continue
        for part in item.replace(PRIVATE_IP_EXPR, "PRIVATE_IP").split("&&"):
            argv = shlex.split(part)
            if not argv:
                continue
            if argv[0] == "export":
                for kv in argv[1:]:
                    k, _, v = kv.partition("=")
                    out.env[k] = v.replace("PRIVATE_IP", PRIVATE_IP_EXPR)
            else:
                out.steps.append(argv)
    return out


def flag_dict(argv: list[str]) -> dict[str, str | None]:
    """``--a=1 --b 2 --c`` -> {"--a": "1", "--b": "2", "--c": None} (argv after the command)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise AssertionError(f"unexpected positional argument {a!r} in {argv}")
        if "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[a] = argv[i + 1]
            i += 1
        else:
            out[a] = None
        i += 1
    return out


# --------------------------------------------------------------------------- processes
def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def marked_pids(mark: str) -> list[int]:
    """PIDs of the processes whose environment carries ``MARK_ENV=mark``."""
    want = f"{MARK_ENV}={mark}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            env = (p / "environ").read_bytes()
        except OSError:
            continue
        if want in env.split(b"\0"):
            out.append(int(p.name))
    return out


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds (these PIDs only)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


# --------------------------------------------------------------------------- the cluster
class LocalCluster:
    """Head + worker on 127.0.0.2 / 127.0.0.3 (1 CPU each unless told), token auth, the MLflow
    server of the head's start command."""

    def __init__(self, bin_dir: Path, num_cpus: int = 1, root: Path | None = None,
                 private_worker_shared: bool = False) -> None:
        self.bin_dir = Path(bin_dir)
        # the worker node starts in its own mount namespace with a tmpfs over ``shared``: it
        # cannot see the head's disk there (a node without the shared mount)
        self.private_worker_shared = private_worker_shared
        self.num_cpus = num_cpus
        # Short: unix socket paths under <temp-dir>/session_*/sockets must stay under ~107 chars.
        self.root = Path(root or tempfile.mkdtemp(prefix="gc", dir="/tmp"))
        self.home = self.root / "home"
        self.shared = self.root / "shared"
        self.home.mkdir(parents=True, exist_ok=True)
        self.shared.mkdir(parents=True, exist_ok=True)
        self.mark = uuid.uuid4().hex
        names = ["gcs", "dashboard", "mlflow", "client"]
        per_node = ["object_manager", "node_manager", "agent_listen", "agent_grpc",
                    "runtime_env_agent", "metrics"]
        ports = iter(free_ports(len(names) + 2 * len(per_node)))
        self.ports: dict[str, int] = {n: next(ports) for n in names}
        self.node_ports = {node: {n: next(ports) for n in per_node} for node in ("head", "worker")}
        self.temp = {"head": self.root / "h", "worker": self.root / "w"}
        self.log: list[str] = []
        self.timings: dict[str, float] = {}
        self.node_env: dict[str, dict[str, str]] = {}
        self.mlflow_argv: list[str] = []

    # ------------------------------------------------------------------ environment
    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "MLFLOW_", "TUNE_", "GRANET_"))}
        env.update({
            "HOME": str(self.home),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            MARK_ENV: self.mark,
        })
        return env

    def local_value(self, text: str) -> str:
        """A yaml / README value with this cluster's ports, paths and IPs."""
        head = NODE_IPS["head"]
        text = text.replace(PRIVATE_IP_EXPR, head)
        text = text.replace("$RAY_HEAD_IP", head).replace("${RAY_HEAD_IP}", head)
        text = text.replace(SHARED, str(self.shared)).replace(IMAGE_CHECKOUT, str(REPO))
        for cloud, name in PORTS.items():
            text = re.sub(rf"(?<=:){cloud}\b", str(self.ports[name]), text)
        return text

    @property
    def token_path(self) -> Path:
        return self.home / ".ray" / "auth_token"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{NODE_IPS['head']}:{self.ports['mlflow']}"

    # ------------------------------------------------------------------ running commands
    def run(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        t0 = time.time()
        proc = subprocess.run(argv, env=env or self.base_env(), cwd=cwd, timeout=timeout,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        self.log.append(f"$ {shlex.join(argv)}  ({time.time() - t0:.1f} s, rc {proc.returncode})")
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def _node_env(self, cmd: StartCommand) -> dict[str, str]:
        env = self.base_env()
        for k, v in cmd.env.items():  # in order: a later export may use an earlier one
            env[k] = _expand(self.local_value(v), env)
        return env

    def _ray_start_argv(self, node: str, argv: list[str]) -> list[str]:
        flags = flag_dict(argv[2:])
        out = ["ray", "start"]
        for k, v in flags.items():
            if k in DROPPED_FLAGS:
                continue
            if k in LOCAL_ONLY_FLAGS:
                raise AssertionError(f"{k} is set by the local simulation; not in the yaml")
            if k == "--port":
                v = str(self.ports["gcs"])
            elif k == "--dashboard-port":
                v = str(self.ports["dashboard"])
            elif k == "--object-manager-port":
                v = str(self.node_ports[node]["object_manager"])
            elif v is not None:
                v = self.local_value(v)
            out.append(k if v is None else f"{k}={v}")
        np = self.node_ports[node]
        out += [
            f"--temp-dir={self.temp[node]}",
            f"--num-cpus={self.num_cpus}",
            f"--node-ip-address={NODE_IPS[node]}",
            f"--node-manager-port={np['node_manager']}",
            f"--dashboard-agent-listen-port={np['agent_listen']}",
            f"--dashboard-agent-grpc-port={np['agent_grpc']}",
            f"--runtime-env-agent-port={np['runtime_env_agent']}",
            f"--metrics-export-port={np['metrics']}",
        ]
        if node == "head":
            out.append(f"--ray-client-server-port={self.ports['client']}")
        return out

    def start_node(self, node: str) -> None:
        """Run the yaml's start command of ``node`` ("head" / "worker") with local values."""
        cmd = parse_start_commands(node)
        env = self._node_env(cmd)
        self.node_env[node] = env
        for argv in cmd.steps:
            t0 = time.time()
            if argv[:2] == ["ray", "start"]:
                start = self._ray_start_argv(node, argv)
                if node == "worker" and self.private_worker_shared:
                    start = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs none {shlex.quote(str(self.shared))} && "
                             'exec "$@"', "sh", *start]
                self.run(start, env=env, timeout=180)
                self.timings[f"ray start ({node})"] = time.time() - t0
            elif argv[0].endswith("start_mlflow_server.sh"):
                if argv[2] != "5000":
                    raise AssertionError(f"start_mlflow_server.sh PORT: expected 5000: {argv}")
                local = [_expand(self.local_value(a), env) for a in argv]
                local[2] = str(self.ports["mlflow"])
                self.mlflow_argv = local
                self.run(local, env=env, timeout=200)
                self.timings["mlflow server"] = time.time() - t0
            else:
                self.run([_expand(self.local_value(a), env) for a in argv], env=env)

    def bring_up(self) -> None:
        """Run the README's cluster commands up to the job (the job command is kept for
        :meth:`job_argv`): token, ``ray up`` (= the yaml's head and worker start commands),
        ``ray dashboard`` (skipped), client exports."""
        self.client_exports: dict[str, str] = {}
        self.job_template: list[str] | None = None
        for cmd in readme_commands():
            argv = shlex.split(cmd)
            if argv[:2] == ["ray", "get-auth-token"]:
                self.run(argv, timeout=120)
                if not self.token_path.is_file():
                    raise AssertionError(f"{cmd!r} wrote no {self.token_path}")
            elif argv[:2] == ["ray", "up"]:
                t0 = time.time()
                self.start_node("head")
                self.start_node("worker")
                self.wait_for_nodes(2)
                self.timings["cluster up"] = time.time() - t0
            elif argv[:2] == ["ray", "dashboard"]:
                continue  # an SSH port forward; the dashboard is on 127.0.0.1 here already
            elif argv[0] == "export":
                for kv in argv[1:]:
                    k, _, v = kv.partition("=")
                    self.client_exports[k] = v
            elif argv[:3] == ["ray", "job", "submit"]:
                self.job_template = argv
            else:
                raise AssertionError(f"no local equivalent for the README command {cmd!r}")
        if self.job_template is None:
            raise AssertionError("the README's cluster commands have no `ray job submit`")

    def client_env(self, **extra: str) -> dict[str, str]:
        """A client on "your machine": the token in $HOME/.ray and the README's exports."""
        env = self.base_env()
        env.update(getattr(self, "client_exports", {}))
        env.update(extra)
        return env

    def job_argv(self, extra_args: list[str] = (), study_dir: Path | None = None) -> list[str]:
        """The README's ``ray job submit`` with local values (address, study_dir) and
        ``extra_args`` appended to its entrypoint."""
        out = []
        for a in self.job_template:
            a = self.local_value(a)
            if study_dir is not None and a.startswith("study_dir="):
                a = f"study_dir={study_dir}"
            out.append(a)
        return out + list(extra_args)

    def submit(self, workdir: Path, extra_args: list[str] = (), study_dir: Path | None = None,
               timeout: float = 600, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess:
        """Run the job command from ``workdir`` and wait for the job to end."""
        return self.run(self.job_argv(extra_args, study_dir), env=env or self.client_env(),
                        cwd=workdir, timeout=timeout, check=False)

    # ------------------------------------------------------------------ introspection
    def api(self, path: str, token: str | None = None, timeout: float = 20) -> Any:
        """GET the dashboard's HTTP API with the cluster token (``token=""``: without one)."""
        token = self.token_path.read_text().strip() if token is None else token
        req = urllib.request.Request(self.dashboard_url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def nodes(self) -> list[dict[str, Any]]:
        data = self.api("/api/v0/nodes?limit=100&detail=1")
        return data["data"]["result"]["result"]

    def node_ids(self) -> dict[str, str]:
        """{"head": node_id, "worker": node_id}: the nodes' IDs by their (distinct) IPs."""
        by_ip = {n["node_ip"]: n["node_id"] for n in self.nodes()}
        return {node: by_ip[ip] for node, ip in NODE_IPS.items() if ip in by_ip}

    def alive_nodes(self) -> int:
        return sum(1 for n in self.nodes() if n.get("state") == "ALIVE")

    def raylet_pid(self, node: str) -> int:
        """The raylet of ``node``: a marked process named raylet whose command line holds the
        node's temp dir."""
        import psutil

        for pid in marked_pids(self.mark):
            try:
                p = psutil.Process(pid)
                if p.name() == "raylet" and str(self.temp[node]) in " ".join(p.cmdline()):
                    return pid
            except psutil.Error:
                continue
        raise AssertionError(f"no raylet found for the {node} node")

    def node_pids(self, node: str) -> list[int]:
        """Every live process of ``node``: its raylet, the raylet's descendants (workers,
        agents) and the processes `ray start` left with the node's temp dir (log monitor)."""
        import psutil

        pids = set()
        raylet = self.raylet_pid(node)
        pids.add(raylet)
        try:
            pids.update(p.pid for p in psutil.Process(raylet).children(recursive=True))
        except psutil.Error:
            pass
        where = str(self.temp[node])
        for pid in marked_pids(self.mark):
            try:
                p = psutil.Process(pid)
                if where in " ".join(p.cmdline()) or p.cwd().startswith(where):
                    pids.add(pid)
            except psutil.Error:
                continue
        return sorted(pids, key=lambda pid: pid != raylet)  # the raylet first

    def node_processes(self, node: str) -> list[str]:
        """Live processes of this cluster whose command line or working directory lies under
        ``node``'s temp dir (its raylet, agents and workers)."""
        import psutil

        where = str(self.temp[node])
        out = []
        for pid in marked_pids(self.mark):
            try:
                p = psutil.Process(pid)
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if where in " ".join(p.cmdline()) or p.cwd().startswith(where):
                    out.append(f"{pid} {' '.join(p.cmdline())[:160]}")
            except psutil.Error:
                continue
        return out

    def diagnostics(self, output: str = "") -> str:
        """The commands run so far, the tail of ``output`` and of the job drivers' logs."""
        parts = ["\n".join(self.log), output[-6000:]]
        logs = {p.resolve() for p in self.temp["head"].glob("session_*/logs/job-driver-*.log")}
        for log in sorted(logs):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if self.alive_nodes() >= n:
                    return
            except (OSError, urllib.error.URLError, KeyError):
                pass
            if time.time() > deadline:
                raise AssertionError(f"fewer than {n} nodes alive after {timeout} s")
            time.sleep(0.5)

    # ------------------------------------------------------------------ teardown
    def stop(self, remove: bool = True) -> list[int]:
        """Stop every process carrying this cluster's mark (by PID), then remove the temp dir."""
        pids = marked_pids(self.mark)
        if pids:
            kill_pids(pids)
        # A second pass: processes spawned while the first pass was stopping their parents.
        late = marked_pids(self.mark)
        if late:
            kill_pids(late, grace=2.0)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        return pids + late


def _expand(text: str, env: dict[str, str]) -> str:
    """$VAR / ${VAR} from ``env`` (unknown variables are left as they are)."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)
