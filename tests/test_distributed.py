"""torchrun + gloo on CPU: DDP training, exact all-reduced evaluation, elastic restarts.
Every subprocess has a timeout, so a hung rendezvous fails the test instead of CI."""

import json

import pytest

from .conftest import TINY, run_cli, run_torchrun
from .helpers import assert_bitwise_equal, final_weights, read_jsonl

ARGS = [*TINY, "--iters", "40", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=10", "--json"]


def rank_results(proc):
    """The JSON line each rank prints at the end (torchrun --tee prefixes lines with the rank)."""
    results = {}
    for line in proc.stdout.splitlines():
        if '{"rank"' in line:
            obj = json.loads(line[line.index("{"):])
            results[obj["rank"]] = obj
    return results


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(600)
def test_two_ranks_train_and_agree_and_restart_exactly(tmp_path, tiny_data):
    ref = tmp_path / "ref"
    proc = run_torchrun(2, [*ARGS, "--data-dir", str(tiny_data), "--out", str(ref)])
    results = rank_results(proc)
    assert set(results) == {0, 1}
    assert results[0]["test_error"] == results[1]["test_error"] < 60
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert summary["test_error"] == results[0]["test_error"]

    # rank 1 is SIGKILLed after iteration 25; torchrun restarts both workers, which resume at 20
    cut = tmp_path / "cut"
    proc = run_torchrun(2, [*ARGS, "--data-dir", str(tiny_data), "--out", str(cut)], extra=["--max-restarts=1"],
                        kill_at=(25, 1))
    assert "resuming from ckpt_0000020.pt (iteration 20 of 40)" in proc.stdout
    assert_bitwise_equal(final_weights(ref), final_weights(cut))
    assert [r["test_error"] for r in read_jsonl(cut / "metrics.jsonl")] == [
        r["test_error"] for r in read_jsonl(ref / "metrics.jsonl")
    ]


@pytest.mark.slow  # a multi-process run: in CI's whole suite, not the fast one
@pytest.mark.timeout(300)
def test_cli_launches_torchrun_itself(tmp_path, tiny_data):
    out = tmp_path / "run"
    # "--n": the launcher must shield it from torchrun's parser
    args = ["--n" if a == "-n" else a for a in ARGS]
    proc = run_cli(["train", *args, "--iters", "10", "--data-dir", str(tiny_data), "--out", str(out),
                    "--nproc-per-node", "2", "--set", "dist.batch_scaling=per_rank"], timeout=240)
    summary = json.loads((out / "summary.json").read_text())
    # per_rank: each rank takes the whole optim.batch_size, so the global batch doubles
    assert summary["world_size"] == 2 and summary["global_batch"] == 64
    assert proc.stdout.count('"rank"') == 2


@pytest.mark.timeout(120)
def test_indivisible_global_batch_is_refused_before_workers_start(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_cli(["train", *TINY, "--data-dir", str(tiny_data), "--out", str(out), "--nproc-per-node", "3"],
                   check=False)
    assert proc.returncode == 2
    assert "optim.batch_size=32 does not divide across 3 ranks" in proc.stderr
    assert "torch.distributed" not in proc.stderr and not out.exists()
