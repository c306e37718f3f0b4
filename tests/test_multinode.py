"""Two nodes for real (tests/netns.py): separate network namespaces joined by a veth pair,
their own hostnames and /etc/hosts, and a private tmpfs at the run directory's parent, so
node1 never sees what rank 0 writes. launch/torchrun-multi-node.sh runs on both, gloo, with
the c10d rendezvous on node0; one worker per node.

(a) the 2-node run ends with the test error of a 2-process one-node run of the same command;
(b) a worker SIGKILLed on node1 under MAX_RESTARTS=1 restarts both nodes, and the run ends
    bitwise equal to (a) although node1 holds no checkpoint;
(c) node1 lost entirely (every process SIGKILLed) under NNODES=1:2: node0 finishes alone;
(d) node1's worker frozen with SIGSTOP (dist.timeout_s far away): node0's rank names the hang
    after dist.hang_timeout_s and exits 7, both torchruns restart (node1's kills its frozen
    worker after its 30 s grace), and the run ends bitwise equal to (a);
and a node without the data folder stops the job with one line naming its host and path.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, TINY, cli_env
from .netns import two_nodes, unavailable
from .helpers import assert_bitwise_equal

pytestmark = [pytest.mark.slow]

SCRIPT = str(REPO / "launch" / "torchrun-multi-node.sh")
# dist.timeout_s: a lost peer that no socket error reveals fails a collective within a minute (the
# hang watchdog off, as it must be below dist.timeout_s; the hang test turns it on)
# --json: each rank ends with its result as a JSON line (the tests read rank 1's on node1)
ARGS = [*TINY, "--iters", "40", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=10",
        "--set", "dist.timeout_s=60", "--set", "dist.hang_timeout_s=0", "--json"]  # hang: the collective timeout alone
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def namespaces_possible():
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-node tests: {reason}")


@pytest.fixture
def make_nodes(namespaces_possible, tmp_path):
    """node0 and node1 with a private tmpfs at tmp_path/runs (and at tmp_path/local)."""
    with two_nodes(tmp_path, private=[tmp_path / "runs", tmp_path / "local"]) as nodes:
        yield nodes


def launch_env(nnodes: str, endpoint: str, nproc: int, restarts: int, **extra: str) -> dict[str, str]:
    return cli_env(**{"NNODES": nnodes, "NPROC": str(nproc), "RDZV_ENDPOINT": endpoint, "RDZV_ID": "mn-test",
                      "MAX_RESTARTS": str(restarts), "PYTHON": sys.executable, **extra})


def kill_env(at: int, rank: int) -> dict[str, str]:
    """launch_env's additions for a worker SIGKILLed after iteration `at` on `rank` (first
    attempt only): the launch script's PYTHON becomes the test-side tests/_kill_python.sh."""
    return {"PYTHON": str(REPO / "tests" / "_kill_python.sh"), "REAL_PYTHON": sys.executable,
            "KILL_AT": str(at), "KILL_RANK": str(rank)}


def run_on_nodes(nodes, args: list[str], logs: Path, nnodes: str = "2", restarts: int = 0,
                 during=None, **env: str) -> list[tuple[int, str]]:
    """The same command on both nodes; (exit code, output) of each. `during(nodes, procs)`,
    if given, runs while they train."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = [node.popen(["bash", SCRIPT, *args], logs / f"{node.name}.log",
                        launch_env(nnodes, "node0:29400", 1, restarts, **env), REPO) for node in nodes]
    if during is not None:
        during(nodes, procs)
    deadline = time.monotonic() + RUN_TIMEOUT
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("multi-node run timed out\n" + outputs(logs, nodes))
    return [(p.returncode, (logs / f"{n.name}.log").read_text()) for p, n in zip(procs, nodes)]


def outputs(logs: Path, nodes) -> str:
    return "\n".join(f"--- {n.name}\n{(logs / f'{n.name}.log').read_text()[-4000:]}" for n in nodes)


def summary_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith('{"rank": 0')))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_weights(path: Path):
    from resnetdist import checkpoint

    return checkpoint.load(path)["model"]


@pytest.fixture(scope="module")
def one_node(namespaces_possible, tmp_path_factory, tiny_data):
    """The same command on one node (this machine, loopback) with two processes."""
    out = tmp_path_factory.mktemp("onenode") / "run"
    env = launch_env("1", f"127.0.0.1:{free_port()}", 2, 0)
    proc = subprocess.run(["bash", SCRIPT, *ARGS, "--data-dir", str(tiny_data), "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, summary_line(proc.stdout)


@pytest.fixture(scope="module")
def two_node(namespaces_possible, tmp_path_factory, tiny_data):
    """(a), kept for (b): the clean 2-node run; its run directory copied off node0."""
    root = tmp_path_factory.mktemp("twonode")
    with two_nodes(root, private=[root / "runs"]) as nodes:
        out = root / "runs" / "run"
        t0 = time.monotonic()
        results = run_on_nodes(nodes, [*ARGS, "--data-dir", str(tiny_data), "--out", str(out)], root / "logs")
        wall = time.monotonic() - t0
        assert [code for code, _ in results] == [0, 0], outputs(root / "logs", nodes)
        assert not nodes[1].path(out).exists(), "node1 wrote a run directory"
        weights = load_weights(nodes[0].path(out / "model.pt"))
        summary = json.loads(nodes[0].path(out / "summary.json").read_text())
    print(f"2-node run (40 iterations): {wall:.1f} s")
    return weights, summary, results


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_a_two_node_run_matches_a_two_process_one_node_run(one_node, two_node):
    ref_dir, ref = one_node
    weights, summary, results = two_node
    assert summary["world_size"] == 2 and summary["iterations"] == 40
    assert summary["test_error"] == ref["test_error"]
    assert summary_line(results[0][1])["test_error"] == ref["test_error"]
    assert '{"rank": 1' in results[1][1]  # rank 1 ran on node1 and agreed
    assert_bitwise_equal(load_weights(ref_dir / "model.pt"), weights)  # gloo's 2-rank sum is exact


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_b_a_worker_killed_on_node1_restarts_from_rank0s_disk_exactly(make_nodes, two_node, tmp_path, tiny_data):
    out = tmp_path / "runs" / "run"
    t0 = time.monotonic()
    results = run_on_nodes(make_nodes, [*ARGS, "--data-dir", str(tiny_data), "--out", str(out)], tmp_path / "logs",
                           restarts=1, **kill_env(25, 1))
    wall = time.monotonic() - t0
    log = outputs(tmp_path / "logs", make_nodes)
    assert [code for code, _ in results] == [0, 0], log
    assert "resuming from ckpt_0000020.pt (iteration 20 of 40)" in results[0][1], log
    assert "Traceback" not in results[1][1] and "FileNotFoundError" not in results[1][1], log
    assert not make_nodes[1].path(out).exists()  # node1 never had the checkpoint
    assert_bitwise_equal(two_node[0], load_weights(make_nodes[0].path(out / "model.pt")))
    print(f"2-node run with a worker SIGKILLed at iteration 25 and restarted: {wall:.1f} s")


def node0_checkpointed(nodes, procs, out: Path, deadline: float) -> bool:
    """Wait until node0 has written a checkpoint of `out`; False if a launcher ended first or
    the deadline passed (the test's assertions on the outcome then say what went wrong)."""
    while not list(nodes[0].path(out).glob("ckpt_*.pt")):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def lose_node1_after_first_checkpoint(out: Path, node0_log: Path):
    """Kill node1 once node0 has a checkpoint; time until node0 trains on alone."""
    def during(nodes, procs):
        deadline = time.monotonic() + RUN_TIMEOUT / 2
        if not node0_checkpointed(nodes, procs, out, deadline):
            return
        nodes[1].lose()
        during.lost_at = time.monotonic()
        while "world size changed" not in node0_log.read_text() and procs[0].poll() is None:
            if time.monotonic() > deadline + RUN_TIMEOUT / 2:
                return
            time.sleep(0.1)
        during.resumed_after = time.monotonic() - during.lost_at
    return during


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_c_node1_lost_entirely_node0_finishes_alone(make_nodes, tmp_path, tiny_data):
    out = tmp_path / "runs" / "run"
    args = [*ARGS, "--iters", "200", "--set", "train.eval_every=100", "--data-dir", str(tiny_data), "--out", str(out)]
    during = lose_node1_after_first_checkpoint(out, tmp_path / "logs" / "node0.log")
    t0 = time.monotonic()
    results = run_on_nodes(make_nodes, args, tmp_path / "logs", nnodes="1:2", restarts=1, during=during,
                           RDZV_CONF="last_call_timeout=5")
    log = outputs(tmp_path / "logs", make_nodes)
    assert hasattr(during, "lost_at"), "node1 was never lost\n" + log
    finished = time.monotonic() - during.lost_at
    code0, out0 = results[0]
    assert code0 == 0, log
    assert results[1][0] != 0  # every process of node1 was killed
    assert "exitcode  : 7" in out0 or "PeerLost" in out0 or "another rank stopped answering" in out0, log
    assert "world size changed: the checkpoint was written by 2 rank(s), this run has 1" in out0, log
    summary = json.loads(make_nodes[0].path(out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["iterations"] == 200
    print(f"node1 lost after the first checkpoint: node0 resumed alone {during.resumed_after:.1f} s later, "
          f"finished {finished:.1f} s later (whole run {time.monotonic() - t0:.1f} s)")


def freeze_node1_worker_after_first_checkpoint(out: Path, node0_log: Path):
    """SIGSTOP node1's worker once node0 has a checkpoint; time until node0 reports the hang,
    until the frozen worker is gone and until the job resumes."""
    import psutil

    def during(nodes, procs):
        if not node0_checkpointed(nodes, procs, out, time.monotonic() + RUN_TIMEOUT / 2):
            return
        (frozen,) = [p for p in psutil.Process(procs[1].pid).children(recursive=True)
                     if "train" in p.cmdline() and p.environ().get("RANK") == "1"]
        frozen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        times = {}
        while "resuming from" not in node0_log.read_text().split("no progress for")[-1] and procs[0].poll() is None:
            text = node0_log.read_text()
            if "hang" not in times and "(dist.hang_timeout_s)" in text:
                times["hang"] = time.monotonic() - t0
            if "killed" not in times and (not frozen.is_running() or frozen.status() == psutil.STATUS_ZOMBIE):
                times["killed"] = time.monotonic() - t0
            if time.monotonic() - t0 > RUN_TIMEOUT / 2:
                return
            time.sleep(0.1)
        times["resumed"] = time.monotonic() - t0
        during.times = times
    return during


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_d_node1_worker_stopped_node0_reports_the_hang_and_the_job_resumes_exactly(make_nodes, two_node, tmp_path,
                                                                                    tiny_data):
    out = tmp_path / "runs" / "run"
    args = [*ARGS, "--set", "dist.timeout_s=300", "--set", "dist.hang_timeout_s=10", "--data-dir", str(tiny_data),
            "--out", str(out)]
    during = freeze_node1_worker_after_first_checkpoint(out, tmp_path / "logs" / "node0.log")
    t0 = time.monotonic()
    results = run_on_nodes(make_nodes, args, tmp_path / "logs", restarts=1, during=during)
    log = outputs(tmp_path / "logs", make_nodes)
    assert hasattr(during, "times"), "the job did not resume after the SIGSTOP\n" + log
    assert [code for code, _ in results] == [0, 0], log
    out0 = results[0][1]
    assert re.search(r"error: rank 0 on node0: no progress for 10 s \(dist.hang_timeout_s\) after iteration \d+, "
                     r"waiting in the ", out0), log
    assert "(exitcode: 7)" in out0 and re.search(r"resuming from ckpt_\d+\.pt \(iteration [123]0 of 40\)", out0), log
    times = during.times
    assert times["hang"] < 10 + 5 and times["killed"] < times["hang"] + 40, times
    assert_bitwise_equal(two_node[0], load_weights(make_nodes[0].path(out / "model.pt")))
    print(f"node1's worker SIGSTOPped: node0's rank reported the hang {times['hang']:.1f} s later, the frozen "
          f"worker was killed at {times['killed']:.1f} s, the job resumed at {times['resumed']:.1f} s "
          f"(whole run {time.monotonic() - t0:.1f} s)")


@pytest.mark.timeout(RUN_TIMEOUT)
def test_a_node_without_the_data_folder_stops_the_job_with_one_line(make_nodes, tmp_path, tiny_data):
    import shutil

    data = tmp_path / "local" / "cifar"  # node-local: a copy on node0's private disk only
    shutil.copytree(tiny_data, make_nodes[0].path(data))
    out = tmp_path / "runs" / "run"
    t0 = time.monotonic()
    results = run_on_nodes(make_nodes, [*ARGS, "--data-dir", str(data), "--out", str(out)], tmp_path / "logs")
    wall = time.monotonic() - t0
    log = outputs(tmp_path / "logs", make_nodes)
    line = f"error: host node1: data folder {data} not found"
    for code, output in results:
        assert code != 0 and output.count(line) == 1, log  # rank 0 (node0) and rank 1 (node1) say it
        assert f'File "{REPO / "resnetdist"}' not in output  # no worker traceback (torchrun's own may follow)
    assert not make_nodes[0].path(out).exists()  # stopped before anything was written
    print(f"node1 without the data folder: both nodes stopped in {wall:.1f} s")



@pytest.mark.timeout(RUN_TIMEOUT)
def test_a_node_without_the_beton_files_stops_the_job_with_one_line(make_nodes, tmp_path, tiny_data):
    pytest.importorskip("ffcv")
    betons = tmp_path / "local" / "beton"  # node-local: rank 0 converts on node0's private disk only
    out = tmp_path / "runs" / "run"
    args = [*ARGS, "--set", "data.loader=ffcv", "--set", f"data.beton_dir={betons}", "--set", "data.ffcv_workers=1",
            "--data-dir", str(tiny_data), "--out", str(out)]
    t0 = time.monotonic()
    results = run_on_nodes(make_nodes, args, tmp_path / "logs")
    log = outputs(tmp_path / "logs", make_nodes)
    line = f"error: host node1: beton file {betons}/train.beton not found"
    for code, output in results:
        assert code != 0 and output.count(line) == 1, log
        assert f'File "{REPO / "resnetdist"}' not in output
    assert make_nodes[0].path(betons / "train.beton").exists() and not list(make_nodes[0].path(out).glob("ckpt_*"))
    print(f"node1 without the .beton files: both nodes stopped in {time.monotonic() - t0:.1f} s")

# ----- Slurm across the two nodes -------------------------------------------------------------------


@pytest.fixture
def slurm_two_nodes(namespaces_possible, tmp_path, tmp_path_factory):
    """slurmctld + slurmd on node0, a second slurmd on node1 (tests/slurm_cluster.py), in a
    short folder of the session's: slurmstepd's socket in the spool folder must fit a Unix
    socket path's 108 bytes, which this test's own folder (under pytest-xdist's popen-gwN/)
    overran by 2 ("launch failed requeued held", the job's script never started)."""
    from .slurm_cluster import BINARIES, _which, start_two_node_cluster

    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"Slurm: {', '.join(missing)} not installed (apt-get install slurmctld slurmd slurm-client munge)")
    root = tmp_path_factory.mktemp("slurm")
    with two_nodes(tmp_path, private=[tmp_path / "runs"]) as nodes:
        cluster = start_two_node_cluster(root, nodes)
        try:
            yield nodes, cluster
        finally:
            try:
                cluster.cancel_all()
            finally:
                cluster.stop()


def warn_and_release(cluster, node0, job: str, out: Path, log: Path) -> None:
    """`scancel --signal=USR1 --batch` once node0 has a checkpoint; release the requeued job
    once both nodes are idle again (see tests/slurm_cluster.py on releasing too early)."""
    deadline = time.monotonic() + 150
    while not list(node0.path(out).glob("ckpt_*.pt")):
        assert time.monotonic() < deadline, (cluster.job_state(job), log.read_text() if log.exists() else "",
                                             cluster.logs())
        time.sleep(0.2)
    cluster.warn_and_release(job, log, deadline + 60)


@pytest.mark.slurm
@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_slurm_job_on_two_nodes_checkpoints_requeues_and_resumes_exactly(slurm_two_nodes, two_node, tmp_path,
                                                                          tiny_data):
    """`sbatch -N 2 launch/slurm.sbatch`: srun starts torchrun on node0 and node1 (one worker
    each, rendezvous on node0); the warning signal stops both at an agreed iteration with a
    checkpoint on node0's disk; the requeued job resumes and ends bitwise equal to (a)."""
    nodes, cluster = slurm_two_nodes
    out, log = tmp_path / "runs" / "run", tmp_path / "job.out"
    env = cli_env(SLURM_CONF=cluster.env["SLURM_CONF"], GPUS_PER_NODE="1", PYTHON=sys.executable, MAX_RESTARTS="0")
    job = cluster.submit(REPO / "launch" / "slurm.sbatch", [*ARGS, "--data-dir", str(tiny_data), "--out", str(out)],
                         nodes=2, log=log, name="twonode", env=env, cwd=REPO)
    t0 = time.monotonic()
    warn_and_release(cluster, nodes[0], job, out, log)
    cluster.wait_completed(job, log, 240)
    text = log.read_text()
    assert "resnetdist: 2 node(s) x 1 GPU(s), rendezvous node0:" in text, text
    assert "requeueing job" in text and "(restart 1)" in text and "resuming from" in text, text
    assert text.count('{"rank": 1') == 1  # rank 1 (node1) finished the resumed attempt
    assert not nodes[1].path(out).exists()
    summary = json.loads(nodes[0].path(out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert_bitwise_equal(two_node[0], load_weights(nodes[0].path(out / "model.pt")))
    print(f"Slurm, 2 nodes: USR1, checkpoint, requeue, resume: {time.monotonic() - t0:.1f} s from submission")
    print("\n".join(line for line in text.splitlines() if line.startswith(("resnetdist:", "preempted:", "resuming"))))
