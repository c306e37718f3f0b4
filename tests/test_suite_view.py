"""What the suite shows, read from run folders written here through RunDir (no training):
`runs` with a live lock and current training records, two runs of one name in two folders,
reproduce's live display (its lines and bars, in a pipe and on a terminal), and the report's
data: a 5,000-image subset kept apart from full-data runs and said so, and its closing line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from resnetdist.config import load_config
from resnetdist.rundir import Latest, RunDir
from resnetdist.suite.live import Watch, bar_line, evaluation_line, progress_line

from .conftest import cli_in_process
from .helpers import write_fixture_run


def new_run(folder: Path, iters: int = 400) -> RunDir:
    """A run folder as `train` starts it: config.toml and resolved.toml."""
    run = RunDir(folder)
    run.write_config(load_config(None, {"model": {"n": 1}}, [], iters), {"device": "cpu"})
    return run


def append(path: Path, *records: dict) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def training(it: int, error: float = 70.0) -> dict:
    return {"iter": it, "train_loss": 1.9, "train_error": error, "lr": 0.1}


def evaluation(it: int, test: float, seconds: float) -> dict:
    return {"iter": it, "train_error": 72.0, "test_error": test, "train_seconds": seconds}


@pytest.mark.timeout(30)
def test_runs_reads_the_newest_training_record_and_tells_same_named_folders_apart(tmp_path):
    running, other = new_run(tmp_path / "a" / "resnet8-s0"), new_run(tmp_path / "b" / "resnet8-s0")
    append(running.metrics, evaluation(100, 60.0, 10.0))  # 0.1 s per iteration
    append(running.progress, training(160), training(170, 65.5), {"iter": 180})  # 180: no error recorded
    with open(running.progress, "a") as f:
        f.write('{"iter": 19')  # a line being written: skipped
    with running.acquire():
        listed = json.loads(cli_in_process(["runs", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]).stdout)["runs"]
        text = cli_in_process(["runs", str(tmp_path / "a"), str(tmp_path / "b")]).stdout
    live = next(r for r in listed if r["state"] == "running")
    # the newest training record (180), not the evaluation at 100; time left at the evaluation's rate
    assert live["iteration"] == 180 and live["eta_s"] == pytest.approx(0.1 * 220), live
    assert "  a/resnet8-s0  running      iteration 180 of 400 on " in text, text
    assert "  b/resnet8-s0  not started" in text and "2 run(s): 1 running, 1 not started" in text, text
    assert "train error" not in text  # the newest record says no error: none is taken from an older one


def test_live_lines_fit_their_width_and_say_where_the_run_is():
    latest = Latest(training(300, 61.04), evaluation(200, 58.2, 20.0))
    wide = bar_line("resnet20-s0", latest, 2000, 0.2, 120, 12)  # the watcher's rate: 0.2 s/iteration
    assert wide.startswith("resnet20-s0   15% |####") and "| 300/2,000  train err 61.0% test 58.2%  ~5 min left" in wide
    for width in (100, 80, 60, 40, 30):
        line = bar_line("resnet20-s0", latest, 2000, 0.1, width, 12)
        assert len(line) < width and "resnet20-s0" in line and "300/2,000" in line, (width, line)
    assert bar_line("resnet8-s0", Latest(None, None), 2000, None, 80) == "resnet8-s0  starting"
    assert evaluation_line("resnet20-s0", latest.evaluation, 2000) == \
        "resnet20-s0  eval at 200/2,000  train err 72.00%  test err 58.20%"
    # no rate measured by the watcher: the evaluation's (20 s / 200 iterations) gives the time left
    assert progress_line("resnet20-s0", latest, 2000, None) == \
        "resnet20-s0  iteration 300 of 2,000 (15%), train err 61.0%, ~2 min left"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(30)
@pytest.mark.parametrize("terminal", [False, True])
def test_watch_shows_each_evaluation_once_and_bars_only_on_a_terminal(tmp_path, terminal):
    run = new_run(tmp_path / "resnet8-s0", iters=200)
    append(run.metrics, evaluation(50, 70.0, 5.0))  # from an earlier attempt: not shown again
    said, clock = [], Clock()
    screen = io.StringIO() if terminal else None
    watch = Watch(said.append, screen, every_s=1.0, quiet_s=60.0, clock=clock)
    watch.add("resnet8-s0", run, 200)
    append(run.progress, training(60), training(90))
    watch.poll()
    clock.now = 10.0
    append(run.progress, training(100))
    append(run.metrics, evaluation(100, 61.5, 10.0))
    watch.poll()
    watch.poll()  # within every_s: nothing read
    clock.now = 80.0  # quiet for 70 s: in a pipe, one line of where it stands
    append(run.progress, training(150, 55.0))
    watch.poll()
    watch.remove("resnet8-s0")
    watch.close()
    assert [line for line in said if "eval at" in line] == ["resnet8-s0  eval at 100/200  train err 72.00%  test err 61.50%"]
    # the watcher's own rate: 60 iterations (90 -> 150) in 80 s, so the 50 left take ~1 min
    quiet = [line for line in said if "iteration 150" in line]
    if terminal:
        drawn = screen.getvalue()
        assert "resnet8-s0  50% |" in drawn and "100/200" in drawn and "test 61.5%" in drawn, drawn
        assert drawn.endswith("\x1b[J") and not quiet  # the bars cleared at the end; a bar says it all
    else:
        assert quiet == ["resnet8-s0  iteration 150 of 200 (75%), train err 55.0%, ~1 min left"], said
        assert not any("\x1b" in line for line in said)


@pytest.mark.timeout(60)
def test_report_keeps_a_data_subset_apart_and_says_how_much_data_each_run_used(tmp_path):
    from resnetdist.suite.discover import load_runs
    from resnetdist.suite.figures import figure6_axes
    from resnetdist.suite.report import write_report
    from resnetdist.suite.reproduce import written_line

    root = tmp_path / "runs"
    for seed in (0, 1):
        write_fixture_run(root / "full", "resnet8", 8, False, seed, 40.0, iters=200, points=4,
                          data_identity="unknown", train_images=50_000, data_dir="/data/full")
    write_fixture_run(root / "subset", "resnet8", 8, False, 0, 55.0, iters=200, points=4,
                      data_identity="unknown", train_images=5_000, data_dir="/data/subset")
    write_fixture_run(root / "subset", "resnet8", 8, False, 1, 0.0, iters=200, points=4, finished=False,
                      data_dir="/data/subset")  # unfinished: its data is its folder's finished run's
    folders = [root / "full", root / "subset"]
    runs, _ = load_runs(folders)
    assert sorted(r.train_images for r in runs) == [5_000, 5_000, 50_000, 50_000]

    written = write_report(folders, tmp_path / "rep")
    md = Path(written["report"]).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ResNet-8 (")]
    assert [row.split("|")[1:4] for row in rows] == [
        [" ResNet-8 (50,000 training / 10,000 test images) ", " 200 ", " 2 "],
        [" ResNet-8 (5,000 training / 10,000 test images) ", " 200 ", " 1 (+1 unfinished) "]], rows
    assert "5,000 training images (the paper: 50,000)" in rows[1] and "(the paper: 50,000)" not in rows[0]
    assert ("data: 2 run(s) on 50,000 training / 10,000 test images of data that is not verified CIFAR-10 "
            "(unknown origin); 2 run(s) on 5,000 training") in md
    assert md.splitlines()[0] == ("# ResNets and plain nets, 200 of the paper's 64,000 iterations, on 50,000/5,000 "
                                  "training images of data that is not verified CIFAR-10 (unknown origin): "
                                  "not the paper's setting")
    assert "| 5,000 training / 10,000 test images, unknown |" in md  # the runs table, per run
    _, axes, _ = figure6_axes(runs)
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert labels[:2] == ["ResNet-8, 50,000 images (mean of 2 seeds)", "ResNet-8, 5,000 images (mean of 2 seeds)"], labels
    assert len({line.get_color() for line in axes[1].lines}) == 2
    # reproduce's closing line names every figure written
    assert written_line(written) == (f"report: {tmp_path / 'rep' / 'report.md'}; figures in {tmp_path / 'rep'}: "
                                     "figure6.png, curves/resnet8-s0.png, curves/resnet8-s1.png, "
                                     "curves/resnet8-s0-2.png, curves/resnet8-s1-2.png")
