"""Two "nodes" on this machine, for multi-node tests: each a network namespace of its own
(joined to the other by one veth pair, with addresses this module assigns), its own hostname
(UTS namespace), its own /etc/hosts (bind-mounted in its own mount namespace), private tmpfs
folders at given paths (so the nodes share the filesystem except there: e.g. the run
directory's parent) and its own PID namespace (so "the node is lost" is one SIGKILL).

A node is held by one process: `unshare --uts --mount --pid --kill-child -- nsenter --net=NS ...`
whose child (PID 1 of the node) sets the hostname and the mounts, then sleeps. (Not `ip netns
exec`: it remounts /sys, hiding /sys/fs/cgroup, which slurmd needs.) Commands run
on the node with `nsenter --target <that child> --net --uts --mount --pid`. Ending the holder
(by pid) kills PID 1 of the node, which takes every process of the node with it and drops its
mounts; then the network namespaces (and with them the veth pair) are deleted.

    with two_nodes(private=[runs_dir]) as nodes:      # or the `make_nodes` fixture
        p = nodes[0].popen(["hostname"], log)          # -> subprocess.Popen (nsenter)
        nodes[0].path(runs_dir / "x")                  # the node's view of a path, from here
        nodes[1].lose()                                # SIGKILL every process of node1

Needs root, `ip` (iproute2), `unshare` and `nsenter` (util-linux); `unavailable()` says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

TOOLS = ("ip", "unshare", "nsenter", "mount")


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in TOOLS if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install iproute2 util-linux mount)"
    probe = f"rdnprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"`ip netns add` failed here: {getattr(e, 'stderr', '') or e}".strip()
    try:
        _run("unshare", "--uts", "--mount", "--pid", "--mount-proc", "--propagation", "private", "--kill-child",
             "--", "nsenter", f"--net=/run/netns/{probe}", "--", "true")
    except (subprocess.CalledProcessError, OSError) as e:
        return f"`unshare --uts --mount --pid` failed here: {getattr(e, 'stderr', '') or e}".strip()
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@dataclass
class Node:
    name: str  # its hostname
    netns: str
    addr: str
    holder: subprocess.Popen | None = None
    pid1: int = 0  # the node's PID 1, as this machine numbers it
    started: list[subprocess.Popen] = field(default_factory=list)

    def command(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.pid1}", "--net", "--uts", "--mount", "--pid", "--", *cmd]

    def popen(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """Start `cmd` on this node, stdout and stderr to `log`."""
        with open(log, "w") as out:
            proc = subprocess.Popen(self.command(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL)
        self.started.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), capture_output=True, text=True, timeout=timeout)

    def path(self, path: Path) -> Path:
        """`path` as this node sees it, reachable from here (through its PID 1's root)."""
        return Path(f"/proc/{self.pid1}/root") / Path(path).relative_to("/")

    def lose(self) -> None:
        """The node dies at once: SIGKILL to its PID 1 kills every process on it."""
        if self.pid1 and _alive(self.pid1):
            os.kill(self.pid1, 9)

    def stop(self) -> None:
        """End every process started here (by pid), then the node itself."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        self.lose()
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.kill()
            self.holder.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _child_of(pid: int, timeout: float = 20) -> int:
    """The one child of `pid` (unshare's forked PID 1), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise RuntimeError(f"netns: the holder {pid} started no node process")


def _start(node: Node, hosts: Path, private: list[Path]) -> None:
    """The holder of `node`: hostname, hosts file, private tmpfs folders, then sleep."""
    mounts = " && ".join(f"mount -t tmpfs -o size=512m,mode=0755 tmpfs '{p}'" for p in private) or "true"
    ready = hosts.with_name(f"{node.name}.ready")
    script = (f"hostname {node.name} && mount --bind '{hosts}' /etc/hosts && {mounts} "
              f"&& touch '{ready}' && exec sleep infinity")
    node.holder = subprocess.Popen(
        ["unshare", "--uts", "--mount", "--pid", "--mount-proc", "--propagation", "private", "--kill-child", "--",
         "nsenter", f"--net=/run/netns/{node.netns}", "--", "sh", "-c", script],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    node.pid1 = _child_of(node.holder.pid)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if node.holder.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"netns: node {node.name} did not come up: {node.holder.stderr.read().decode()}")
        time.sleep(0.05)


def _network(nodes: list[Node], subnet: str) -> None:
    """The two network namespaces, loopback up, and one veth pair between them."""
    for node in nodes:
        _run("ip", "netns", "add", node.netns)
        _run("ip", "-n", node.netns, "link", "set", "lo", "up")
    a, b = nodes
    _run("ip", "link", "add", "rdn0", "netns", a.netns, "type", "veth", "peer", "name", "rdn1", "netns", b.netns)
    for node, dev in ((a, "rdn0"), (b, "rdn1")):
        _run("ip", "-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", dev)
        _run("ip", "-n", node.netns, "link", "set", dev, "up")


@contextmanager
def two_nodes(root: Path, private: list[Path] = ()) -> Iterator[list[Node]]:
    """node0 and node1 (see the module). `root` holds the hosts file; every folder in `private`
    is created here if needed and is an empty tmpfs of each node's own."""
    tag = f"{os.getpid() % 10000}{int(time.monotonic() * 1000) % 1000:03d}"
    subnet = 10 + (os.getpid() + int(time.monotonic())) % 200  # 10.213.<subnet>.0/24, on the veth pair only
    nodes = [Node(f"node{i}", f"rdn{tag}-{i}", f"10.213.{subnet}.{i + 1}") for i in range(2)]
    hosts = root / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in nodes))
    for p in private:
        Path(p).mkdir(parents=True, exist_ok=True)
    try:
        _network(nodes, subnet)
        for node in nodes:
            _start(node, hosts, [Path(p) for p in private])
        yield nodes
    finally:
        errors = []
        for node in nodes:
            try:
                node.stop()
            except Exception as e:  # keep removing the rest
                errors.append(f"{node.name}: {e}")
        for node in nodes:
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True, timeout=30)
        if errors:
            raise RuntimeError("netns teardown: " + "; ".join(errors))
