"""FFCV .beton conversion and the "ffcv" loaders, for real (no mocks of FFCV).

The sets are tiny files in the official binary layout; every image carries its record id in
pixel bytes [0,0,0] (id % 256) and [0,0,1] (id // 256), so a test can tell which sample came
back. Skipped as a whole where FFCV is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

_threads = torch.get_num_threads()
pytest.importorskip("ffcv")  # note: `import ffcv` sets torch's thread count to 1
torch.set_num_threads(_threads)

from resnetdist.data import beton, cifar, ffcv_loader  # noqa: E402
from resnetdist.data.beton import beton_paths, prepare_betons, require_ffcv  # noqa: E402
from resnetdist.data.ffcv_loader import FfcvEvalLoader, FfcvTrainLoader  # noqa: E402
from resnetdist.data.feed import Feed  # noqa: E402
from resnetdist.data.cifar import DataError, Split  # noqa: E402
from resnetdist.data.resident import ResidentTrainLoader  # noqa: E402
from resnetdist.data.order import iters_per_epoch, rank_epoch_order  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TRAIN_PER_FILE, TEST_RECORDS = 40, 30  # 200 training records, 30 test records


BINS = cifar.FOLDER  # tests write their .bin files to tmp/<BINS>, the official layout


def write_bins(folder: Path, per_file: int = TRAIN_PER_FILE, test: int = TEST_RECORDS,
               seed: int = 0) -> tuple[Split, Split]:
    """The tests' data set with numbered records (data_batch_1..5 + test_batch) in `folder`,
    which must be named cifar-10-batches-bin; return (train, test). Record i of the training
    files (0.. across the five) and of the test file carries i in pixels [0,0,0] and [0,0,1]
    (low, high byte), so a test can tell which records a loader delivered (`ids`)."""
    assert folder.name == BINS
    cifar.write_synthetic(folder.parent, per_file, test, seed)
    for names in (cifar.BINARY.train_files, cifar.BINARY.test_files):
        first = 0
        for name in names:
            split = cifar.read_batch_file(folder / name)
            images, numbers = split.images.copy(), np.arange(first, first + len(split))
            images[:, 0, 0, 0], images[:, 0, 0, 1] = numbers % 256, numbers // 256
            cifar.write_batch_file(folder / name, Split(images, split.labels))
            first += len(split)
    return cifar.read_files(folder, cifar.BINARY.train_files), cifar.read_files(folder, cifar.BINARY.test_files)


def ids(images: torch.Tensor) -> np.ndarray:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).numpy()


def outputs(out_dir: Path) -> list[str]:
    """What prepare left in out_dir, lock file aside."""
    return sorted(p.name for p in out_dir.iterdir() if p.name != beton.LOCK)


def read_all(path: Path, indices=None, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    loader = FfcvEvalLoader(path, indices, batch, 0, 1, CPU, 1)
    got = list(loader)
    return torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("beton")
    train, test = write_bins(root / BINS)
    train_beton, test_beton, rebuilt = prepare_betons(root / BINS, root / "out")
    assert rebuilt
    return {"bins": root / BINS, "train": train, "test": test,
            "train_beton": train_beton, "test_beton": test_beton}


# --------------------------------------------------------------------------- 1. bit-exact


@pytest.mark.timeout(60)
def test_betons_hold_the_binary_records_bit_for_bit(data):
    for path, split in ((data["train_beton"], data["train"]), (data["test_beton"], data["test"])):
        loader = FfcvEvalLoader(path, None, 16, 0, 1, CPU, 1)
        for _ in range(2):  # re-iterable
            batches = list(loader)
            assert [len(y) for _, y in batches][-1] == len(split) % 16 or len(split) % 16 == 0
            images = torch.cat([x for x, _ in batches])
            labels = torch.cat([y for _, y in batches])
            assert images.dtype == torch.uint8 and labels.dtype == torch.int64
            assert images.shape == (len(split), 3, 32, 32) and images.is_contiguous()
            assert torch.equal(images, torch.from_numpy(split.images))
            assert torch.equal(labels, torch.from_numpy(split.labels))
    # a subset (as with the 45k/5k split), a batch of one, and the torch thread count kept
    threads = torch.get_num_threads()
    idx = np.array([5, 0, 199, 77, 3])
    images, labels = read_all(data["train_beton"], idx, batch=1)
    assert labels.shape == (5,)
    assert torch.equal(images, torch.from_numpy(data["train"].images[idx]))
    assert torch.equal(labels, torch.from_numpy(data["train"].labels[idx]))
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------- 2. order


def take(loader, start: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n iterations' images and labels from `start` on, through the feed (data/feed.py) as a run
    takes them (its buffers are refilled: each batch is cloned)."""
    gen = Feed(loader).batches(start)
    out = [(x.clone(), y.clone()) for x, y, _ in (next(gen) for _ in range(n))]
    gen.close()
    return out


@pytest.mark.timeout(60)
def test_train_order_matches_the_resident_loader(data):
    train, gb = data["train"], 32  # 200 records: 6 iterations per epoch, 8 dropped
    steps = iters_per_epoch(len(train), gb)
    threads = torch.get_num_threads()
    ffcv7 = FfcvTrainLoader(data["train_beton"], None, gb, [7], 0, 1, CPU, 2)
    resident7 = ResidentTrainLoader(train, gb, [7], 0, 1, CPU)

    got = take(ffcv7, 0, 3 * steps)
    ref = take(resident7, 0, 3 * steps)
    for (x, y), (rx, ry) in zip(got, ref):
        assert x.shape == (gb, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert torch.equal(y, torch.from_numpy(train.labels[ids(x)]))  # labels travel with images
    epochs = [np.concatenate([ids(x) for x, _ in got[e * steps : (e + 1) * steps]])
              for e in range(3)]
    for e, seen in enumerate(epochs):  # a permutation of the kept samples, per epoch
        assert len(seen) == steps * gb == len(set(seen.tolist()))
        assert np.array_equal(seen, rank_epoch_order(len(train), gb, 7, e, 0, 1))
    assert not np.array_equal(epochs[0], epochs[1])

    # reproducible with the seed (a fresh loader), different with another seed
    again = take(FfcvTrainLoader(data["train_beton"], None, gb, [7], 0, 1, CPU, 1), 0, steps)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, got))
    other = take(FfcvTrainLoader(data["train_beton"], None, gb, [8], 0, 1, CPU, 1), 0, steps)
    assert not np.array_equal(np.concatenate([ids(x) for x, _ in other]), epochs[0])

    # mid-epoch and epoch-boundary starts, on the same loader object
    for start in (4, 6, 13):
        a = take(ffcv7, start, 2 * steps)
        b = take(resident7, start, 2 * steps)
        assert all(torch.equal(x, rx) and torch.equal(y, ry)
                   for (x, y), (rx, ry) in zip(a, b)), start

    # another rank of two, on a subset of the records (as with the 45k/5k split)
    idx = np.random.default_rng(3).permutation(len(train))[:150]
    sub = Split(train.images[idx], train.labels[idx])
    a = take(FfcvTrainLoader(data["train_beton"], idx, gb, [5], 1, 2, CPU, 1), 7, 8)
    b = take(ResidentTrainLoader(sub, gb, [5], 1, 2, CPU), 7, 8)
    assert all(x.shape[0] == gb // 2 for x, _ in a)
    assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(a, b))
    assert torch.get_num_threads() == threads


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_error_in_ffcvs_thread_raises_instead_of_hanging(data):
    """A failing pipeline kills FFCV's epoch thread without its end-of-epoch marker; plain
    iteration over the FFCV Loader would then block forever."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    # Squeeze() turns the (1, 1) labels of a batch of one into a scalar; ToDevice then fails.
    loader = Loader(str(data["test_beton"]), batch_size=1, num_workers=1, seed=0,
                    pipelines={"image": [NDArrayDecoder(), ToTensor()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(), ToDevice(CPU)]})
    with pytest.raises(RuntimeError, match="loader thread"):
        list(ffcv_loader._epoch(loader))


OPEN_STREAM_CHILD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from resnetdist.data.ffcv_loader import FfcvTrainLoader
    loader = FfcvTrainLoader(Path(sys.argv[1]), None, 512, [0], 0, 1, torch.device("cpu"), 2)
    out = torch.zeros(512, 3, 32, 32, dtype=torch.uint8), torch.zeros(512, dtype=torch.long)
    gen = loader.batches(0, out)
    for _ in range(4):  # 3 iterations per epoch: FFCV's thread is busy in the second epoch
        next(gen)
    # exit with the stream open, as a training loop that just ends does
""")


@pytest.mark.slow  # two processes, each importing FFCV and compiling its numba code
@pytest.mark.timeout(180)
def test_process_exits_cleanly_with_an_open_stream(tmp_path):
    """An FFCV epoch thread still decoding when the interpreter exits aborted the process
    ("terminate called without an active exception") in about half the runs; the loader
    joins its threads at exit. Two children, so a regression shows in most runs."""
    write_bins(tmp_path / BINS, per_file=400, test=10, seed=7)
    train_beton, _, _ = prepare_betons(tmp_path / BINS, tmp_path / "out")
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    children = [subprocess.Popen([sys.executable, "-c", OPEN_STREAM_CHILD, str(train_beton)],
                                 env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    for child in children:
        _, err = child.communicate(timeout=150)  # a hang guard: under CI's load numba's compile alone can take a minute
        assert child.returncode == 0, err[-2000:]


# --------------------------------------------------------------------------- 3. torchrun


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_ranks_shard_train_and_eval_exactly(tmp_path):
    """Also: every rank calls prepare (the lock lets one convert), the workers leave the FFCV
    training stream open at exit (its thread used to abort the process at times), and ask for
    more FFCV workers than numba has threads (FFCV alone raises)."""
    train, test = write_bins(tmp_path / BINS, seed=1)
    gb, epochs, eval_batch, seed = 32, 2, 8, 11
    out = tmp_path / "result.json"
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "_shard_worker.py"), str(tmp_path / BINS), str(tmp_path / "out"),
           str(out), str(gb), str(epochs), str(eval_batch), str(seed)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert sorted(r["rebuilt"] for r in ranks) == [False, True]  # the lock: one rank converted

    steps = iters_per_epoch(len(train), gb)
    for kind in ("resident", "ffcv"):
        for e in range(epochs):
            per_rank = [r[kind]["train"][e] for r in ranks]
            assert all(len(p) == steps for p in per_rank)
            full = rank_epoch_order(len(train), gb, seed, e, 0, 1).reshape(steps, gb)
            for i in range(steps):
                a, b = (per_rank[0][i][0], per_rank[1][i][0])
                assert len(a) == len(b) == gb // 2 and not set(a) & set(b)
                assert a + b == full[i].tolist()  # rank r takes slice r of the global batch
                for r in range(2):
                    assert per_rank[r][i][1] == train.labels[per_rank[r][i][0]].tolist()
            covered = [s for p in per_rank for batch in p for s in batch[0]]
            assert len(covered) == len(set(covered)) == steps * gb  # no overlap, all kept ones
        shards = [[s for batch in r[kind]["eval"] for s in batch[0]] for r in ranks]
        assert shards[0] + shards[1] == list(range(len(test)))  # each test image exactly once
        labels = [l for r in ranks for batch in r[kind]["eval"] for l in batch[1]]
        assert labels == test.labels.tolist()
    # both loader kinds gave the same samples
    assert all(r["resident"] == r["ffcv"] for r in ranks)


# --------------------------------------------------------------------------- 4. prepare


@pytest.mark.timeout(60)
def test_prepare_is_idempotent_and_rebuilds_on_change(tmp_path):
    bins, out = tmp_path / BINS, tmp_path / "out"
    train, _ = write_bins(bins, seed=2)
    train_p, test_p, rebuilt = prepare_betons(bins, out)
    assert rebuilt and (train_p, test_p) == beton_paths(out)
    assert outputs(out) == ["beton.json", "test.beton", "train.beton"]
    manifest = json.loads((out / "beton.json").read_text())
    assert set(manifest["sources"]) == set(cifar.BINARY.files)
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    assert prepare_betons(bins, out) == (train_p, test_p, False)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # a changed source (same size) -> rebuilt, and the new bytes are in the beton
    raw = bytearray((bins / "data_batch_3.bin").read_bytes())
    raw[1 + 100] ^= 0xFF  # record 0 of file 3 = record 80, channel 0, row 3, column 4
    (bins / "data_batch_3.bin").write_bytes(bytes(raw))
    assert prepare_betons(bins, out)[2]
    images, _ = read_all(train_p, [80])
    assert images[0, 0, 3, 4].item() == train.images[80, 0, 3, 4] ^ 0xFF
    assert not prepare_betons(bins, out)[2]

    # a damaged or missing beton -> rebuilt
    with open(train_p, "r+b") as f:
        f.truncate(train_p.stat().st_size - 10)
    assert prepare_betons(bins, out)[2]
    with open(test_p, "r+b") as f:  # same size, one byte flipped
        f.seek(test_p.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    assert prepare_betons(bins, out)[2]
    test_p.unlink()
    assert prepare_betons(bins, out)[2]
    (out / "beton.json").write_text("{not json")
    assert prepare_betons(bins, out)[2]
    assert prepare_betons(bins, out, force=True)[2]
    assert not prepare_betons(bins, out)[2]
    assert outputs(out) == ["beton.json", "test.beton", "train.beton"]


def _interrupt_at(monkeypatch, record: int, exc: BaseException) -> None:
    import ffcv.writer  # _write_beton hands each record to FFCV's handle_sample: record i is written there

    real = ffcv.writer.handle_sample

    def handle_sample(sample, i, *args):
        if i == record:
            raise exc
        return real(sample, i, *args)

    monkeypatch.setattr(ffcv.writer, "handle_sample", handle_sample)


@pytest.mark.timeout(60)
def test_failed_prepare_leaves_nothing_readable(tmp_path, monkeypatch):
    bins, out = tmp_path / BINS, tmp_path / "out"
    write_bins(bins, seed=3)
    _interrupt_at(monkeypatch, 50, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare_betons(bins, out)
    assert outputs(out) == []
    monkeypatch.undo()
    assert prepare_betons(bins, out)[2]
    # a forced rebuild that fails does not leave the previous (now unverified) betons either
    _interrupt_at(monkeypatch, 10, RuntimeError("disk full"))
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_betons(bins, out, force=True)
    assert outputs(out) == []
    monkeypatch.undo()
    assert prepare_betons(bins, out)[2]


KILLED_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ffcv.writer
    from resnetdist.data import beton
    bins, out, marker = map(Path, sys.argv[1:4])
    real = ffcv.writer.handle_sample
    def handle_sample(sample, i, *args):
        if i == 100:  # mid-way through train.beton: tell the parent, then wait to be killed
            marker.write_text("writing")
            time.sleep(600)
        return real(sample, i, *args)
    ffcv.writer.handle_sample = handle_sample
    beton.prepare_betons(bins, out)
""")


@pytest.mark.timeout(90)
def test_sigkilled_prepare_leaves_nothing_readable(tmp_path):
    bins, out, marker = tmp_path / BINS, tmp_path / "out", tmp_path / "marker"
    train, test = write_bins(bins, seed=4)
    # an earlier complete conversion, from other sources: a rebuild must not leave it behind
    write_bins(tmp_path / "old" / BINS, seed=5)
    prepare_betons(tmp_path / "old" / BINS, out)
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(bins), str(out), str(marker)],
                             env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the child ended before it was killed"
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.02)
        partial = out / ("train.beton" + beton.PARTIAL)
        assert partial.exists() and partial.stat().st_size > 0  # killed mid-write
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    left = outputs(out)
    assert "train.beton" not in left and "test.beton" not in left and "beton.json" not in left
    # the next call cleans the stale temporary file (the lock died with the child) and converts
    assert prepare_betons(bins, out)[2]
    assert outputs(out) == ["beton.json", "test.beton", "train.beton"]
    images, labels = read_all(out / "train.beton")
    assert torch.equal(images, torch.from_numpy(train.images))
    assert torch.equal(labels, torch.from_numpy(train.labels))


# --------------------------------------------------------------------------- 5. bad input


@pytest.mark.timeout(60)
def test_truncated_bin_raises_data_error_and_leaves_no_beton(tmp_path):
    bins, out = tmp_path / BINS, tmp_path / "out"
    write_bins(bins, seed=6)
    good = tmp_path / "good"
    shutil.copytree(bins, good)
    bad = bins / "data_batch_2.bin"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_2.bin"):
        prepare_betons(bins, out)
    assert outputs(out) == []
    # the same when valid betons from the earlier, good sources were there
    assert prepare_betons(good, out)[2]
    with pytest.raises(DataError, match="data_batch_2.bin"):
        prepare_betons(bins, out)
    assert outputs(out) == []
    # a bad label and a missing file are named too
    raw = bytearray((good / "test_batch.bin").read_bytes())
    raw[cifar.RECORD_BYTES * 3] = 10
    (bins / "data_batch_2.bin").write_bytes((good / "data_batch_2.bin").read_bytes())
    (bins / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="test_batch.bin"):
        prepare_betons(bins, out)
    (bins / "data_batch_5.bin").unlink()
    with pytest.raises(DataError, match="data_batch_5.bin"):
        prepare_betons(bins, out)
    assert outputs(out) == []


@pytest.mark.timeout(30)
def test_require_ffcv_names_the_install_steps(monkeypatch):
    require_ffcv()
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError
    with pytest.raises(RuntimeError, match="libturbojpeg0-dev"):
        require_ffcv()
