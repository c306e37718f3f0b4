"""A real one-node Slurm cluster for tests, started by the test session and stopped after it.

Debian's slurmctld, slurmd, slurm-client and munge (apt-get install slurmctld slurmd
slurm-client munge): a generated munge key and its own munged socket, slurm.conf and
cgroup.conf in a temporary folder, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
SelectType=select/cons_tres allocating single CPUs (CR_CPU), the node as `slurmd -C` reports
it (this machine's CPUs and memory), no accounting database. Nothing outside the temporary
folder is touched: the daemons run in the foreground as children of the test process, and at
teardown the jobs are cancelled and exactly those daemons are stopped, by pid.

API (import the fixture into a test module: `from .slurm_cluster import slurm_cluster`):

    slurm_cluster  session-scoped pytest fixture -> SlurmCluster; skips the test (with the
                   reason) where the binaries are missing or the process is not root.
    SlurmCluster.env            os.environ plus SLURM_CONF: pass it to every Slurm client and
                                to any process that submits (sbatch exports it into jobs, so
                                scontrol inside a job reaches this cluster too)
    SlurmCluster.run(*args, timeout=60, check=True)   a client command (sinfo, squeue,
                                scontrol, scancel, ...) under that env -> CompletedProcess
    SlurmCluster.node / .cpus / .root   node name, its CPU count, the temporary folder
                                (slurmctld.log and slurmd.log are there, for failing tests)
    SlurmCluster.submit(script, args, nodes=, log=, name=, env=, cwd=)   sbatch it -> job id
    SlurmCluster.job_state(job)         "STATE|reason" from squeue
    SlurmCluster.warn_and_release(job, log, deadline)   USR1 to the batch shell; release the
                                requeued job once the nodes are idle (see below)
    SlurmCluster.wait_completed(job, log, timeout)      until COMPLETED (fails on FAILED)
    SlurmCluster.wait_idle(timeout=60)  wait until no job is queued or running
    SlurmCluster.cancel_all()           scancel every job, then wait_idle

A requeued job is held until its begin time: `scontrol update JobId=J StartTime=now`
(cluster.run("scontrol", "update", f"JobId={j}", "StartTime=now")) releases it. Release it only
once the node is idle again (plus a second or two): released at once after its first attempt
was killed, slurmd may refuse the batch step ("already killed, do not launch") and fail the job.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
SBIN = "/usr/sbin:/sbin"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    node: str
    cpus: int
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # clients run on the controller's node (nsenter ...)

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.prefix, _which(args[0]) or args[0], *args[1:]], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                                 f"{self.logs()}")
        return proc

    def submit(self, script: Path, args: list[str], *, nodes: int, log: Path, name: str, env: dict[str, str],
               cwd: Path) -> str:
        """`sbatch` the script as a user submits it (from the controller's node; no GPUs, one CPU
        a task, ten minutes); returns the job id. env: what the job sees (include SLURM_CONF)."""
        proc = subprocess.run(
            [*self.prefix, "sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=10", f"--output={log}", f"--job-name={name}", str(script), *args],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr + self.logs()
        return proc.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        """"STATE|reason" of the job, e.g. "PENDING|BeginTime" after a requeue."""
        return self.run("squeue", "-h", "--states=all", "-j", job, "-o", "%T|%r", check=False).stdout.strip()

    def warn_and_release(self, job: str, log: Path, deadline: float) -> None:
        """Send the job the warning before its time limit (`scancel --signal=USR1 --batch`), and
        release it once requeued and every node is idle again (by `deadline`, monotonic)."""
        self.run("scancel", "--signal=USR1", "--batch", job)
        # requeued: pending until its begin time. Release it once the nodes have torn the first
        # attempt down, and a clear second after: slurmd revoked the job's credential when it killed
        # the first attempt, and refuses a launch stamped within the same second ("Job N already
        # killed, do not launch batch job"), failing the job. (The begin time Slurm sets is never that early.)
        idle = ["idle"] * len(self.node.split(","))  # every node: `node` names them, comma-separated
        while not (self.job_state(job).startswith("PENDING") and self.node_state().split() == idle):
            assert time.monotonic() < deadline, (self.job_state(job), log.read_text(), self.logs())
            time.sleep(0.2)
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    def wait_completed(self, job: str, log: Path, timeout: float) -> None:
        """Wait until the job has COMPLETED; fail at once if it FAILED, or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while "COMPLETED" not in self.job_state(job):
            assert time.monotonic() < deadline and "FAILED" not in self.job_state(job), (
                self.job_state(job), log.read_text(), self.logs())
            time.sleep(0.5)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.root.glob("slurm*.log")))

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still queued after {timeout} s\n{self.run('squeue').stdout}")
            time.sleep(0.5)

    def cancel_all(self) -> None:
        ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if ids:
            self.run("scancel", *sorted(set(ids)), check=False)
        self.wait_idle()

    def stop(self) -> None:
        """Stop the daemons this fixture started, newest first, by pid."""
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _node_line(node: str, addr: str = "127.0.0.1") -> str:
    """This machine as slurmd sees it (CPUs, sockets, cores, threads, memory), so the node is
    not drained for a configuration that differs from the hardware."""
    line = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    fields = [f for f in line.split() if not f.startswith("NodeName=")]
    return f"NodeName={node} NodeAddr={addr} " + " ".join(fields) + " State=UNKNOWN"


def _write_config(root: Path, node: str, ctl: str = "", nodes: dict[str, str] | None = None) -> Path:
    """slurm.conf and cgroup.conf in root. One node (`node` on 127.0.0.1, slurmctld on this
    machine), or `nodes` {name: address} with slurmctld on `ctl` (the first node's address):
    every slurmd then gets its own spool, pid and log file (%n: the node's name)."""
    # slurmctld only starts on the host named in SlurmctldHost: this machine's own name
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    nodes = nodes or {node: "127.0.0.1"}
    ctl_host = f"{next(iter(nodes))}({ctl})" if ctl else f"{socket.gethostname().split('.')[0]}(127.0.0.1)"
    per_node = "-%n" if len(nodes) > 1 else ""
    node_lines = "\n".join(_node_line(name, addr) for name, addr in nodes.items())
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=resnetdist-test
SlurmctldHost={ctl_host}
MailProg=/bin/true
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={root / 'munge.socket'}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}{per_node}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd'}{per_node}.pid
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd'}{per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    # read beside slurm.conf; nothing here uses cgroups (linuxproc, task/none)
    (root / "cgroup.conf").write_text("CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n")
    return conf


def _start(cluster: SlurmCluster, *cmd: str, prefix: tuple[str, ...] = (), name: str = "") -> None:
    log = open(cluster.root / f"{name or Path(cmd[0]).name}.stdout", "w")
    cluster.daemons.append(subprocess.Popen([*prefix, *cmd], env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL))
    log.close()


def _wait_for(cluster: SlurmCluster, ready, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in cluster.daemons if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"Slurm test cluster: {what} not ready ({'exited: ' + ', '.join(dead) if dead else 'timeout'})"
                               f"\n{cluster.logs()}")
        time.sleep(0.3)


def _start_munged(cluster: SlurmCluster) -> None:
    """munged on this machine; its socket is a file, so it serves every network namespace."""
    root = cluster.root
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    # --force: munged refuses a socket under a world-writable /tmp path otherwise
    _start(cluster, _which("munged"), "--foreground", "--force", f"--socket={root / 'munge.socket'}",
           f"--key-file={key}", f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
           f"--seed-file={root / 'munged.seed'}")
    _wait_for(cluster, (root / "munge.socket").exists, "munged")


def start_cluster(root: Path) -> SlurmCluster:
    node = "resnetdist-node"
    conf = _write_config(root, node)
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root, node, os.cpu_count() or 1, env)
    try:
        _start_munged(cluster)
        _start(cluster, _which("slurmctld"), "-D", "-i", "-f", str(conf))
        _wait_for(cluster, lambda: cluster.run("sinfo", check=False).returncode == 0, "slurmctld")
        _start(cluster, _which("slurmd"), "-D", "-N", node, "-f", str(conf))
        _wait_for(cluster, lambda: cluster.node_state() == "idle", "slurmd (node idle)")
        cluster.cpus = int(cluster.run("sinfo", "-h", "-N", "-o", "%c").stdout.strip())
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_two_node_cluster(root: Path, nodes) -> SlurmCluster:
    """Two nodes of tests/netns.py: slurmctld and one slurmd on node0, a second slurmd on
    node1, NodeAddr their veth addresses; one munged on this machine for both. Clients
    (cluster.run) run on node0, so submit with `nsenter` there too (cluster.prefix)."""
    conf = _write_config(root, "", ctl=nodes[0].addr, nodes={n.name: n.addr for n in nodes})
    for node in nodes:
        (root / f"spool-{node.name}").mkdir()
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root, ",".join(n.name for n in nodes), os.cpu_count() or 1, env,
                           prefix=nodes[0].command([]))
    try:
        _start_munged(cluster)
        _start(cluster, _which("slurmctld"), "-D", "-i", "-f", str(conf), prefix=tuple(nodes[0].command([])))
        _wait_for(cluster, lambda: cluster.run("sinfo", check=False).returncode == 0, "slurmctld")
        for node in nodes:
            _start(cluster, _which("slurmd"), "-D", "-N", node.name, "-f", str(conf),
                   prefix=tuple(node.command([])), name=f"slurmd-{node.name}")
        _wait_for(cluster, lambda: cluster.node_state().split() == ["idle", "idle"], "both slurmds (nodes idle)")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"Slurm test cluster: {', '.join(missing)} not installed "
                    f"(apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("Slurm test cluster: the daemons run as root here; run the tests as root")
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        try:
            cluster.cancel_all()
        finally:
            cluster.stop()
