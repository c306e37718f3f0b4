"""The CLI's conventions, in-process (no training): --depth beside -n, bare section.key=value
settings (a W&B sweep agent's ${args_no_hyphens}, built from configs/sweep-seeds.yaml as the
agent builds it), choices listed in --help and completed by the shell, -h, and what a run's
header and its first Ctrl-C say of the warm-up, the cadence and where the run stops."""

from __future__ import annotations

import itertools

import pytest

from .conftest import REPO, cli_in_process


def test_depth_is_the_paper_s_layers_beside_n(tmp_path):
    out = tmp_path / "run"
    shown = cli_in_process(["train", "--depth", "20", "--device", "cpu", "--out", str(out), "--dry-run"]).stdout
    assert "net             ResNet-20 (269,722 parameters)" in shown and not out.exists()
    assert "n = 3" in shown
    same = cli_in_process(["train", "-d", "110", "-n", "18", "--device", "cpu", "--out", str(out), "--dry-run"]).stdout
    assert "ResNet-110" in same
    for args, message in ((["--depth", "21"], "--depth 21: not 6n+2"),
                          (["--depth", "32", "-n", "3"], "--depth 32 is n = 5, but -n 3 was given too")):
        bad = cli_in_process(["train", *args, "--out", str(out), "--dry-run"], check=False)
        assert bad.exit_code == 2 and message in bad.stderr and not out.exists(), bad.stderr


def test_torchrun_s_parser_passes_depth_on_and_refuses_n():
    """Why the help says -n or --depth under torchrun: its parser reads --n as an abbreviation of
    its own --nnodes/--nproc-per-node before the script's arguments (pytorch#120601)."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--standalone", "-m", "resnetdist", "train", "--depth", "44", "-n", "7"])
    assert args.training_script_args == ["train", "--depth", "44", "-n", "7"]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--standalone", "-m", "resnetdist", "train", "--n", "7"])
    help_text = cli_in_process(["train", "-h"]).stdout
    assert "pytorch#120601" in " ".join(help_text.split())


def test_bare_settings_beside_set_and_a_stray_word_named(tmp_path):
    out = tmp_path / "run"
    shown = cli_in_process(["train", "--device", "cpu", "--out", str(out), "--set", "train.seed=1",
                            "model.n=5", "train.seed=2", "--dry-run"]).stdout
    assert "ResNet-32" in shown and "seed = 2" in shown  # after --set: the bare setting wins
    bad = cli_in_process(["train", "--out", str(out), "seed=2", "--dry-run"], check=False)
    assert bad.exit_code == 2 and "'seed=2': expected section.key=value" in bad.stderr
    bad = cli_in_process(["train", "--out", str(out), "model.nn=2", "--dry-run"], check=False)
    assert bad.exit_code == 2 and "model.nn" in bad.stderr and not out.exists()


def sweep_commands(path) -> list[list[str]]:
    """Every command a W&B sweep agent runs for the sweep file at `path` (a grid): the agent's own
    construction (wandb_agent.Agent._command_run: wandb's create_sweep_command and
    create_sweep_command_args, then its macro substitution)."""
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid"
    names = list(sweep["parameters"])
    commands = []
    for values in itertools.product(*(sweep["parameters"][n]["values"] for n in names)):
        sweep_vars = create_sweep_command_args({"args": {n: {"value": v} for n, v in zip(names, values)}})
        sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
        command = []
        for word in create_sweep_command(list(sweep["command"])):
            word = str(word)
            command += sweep_vars.get(word[2:-1]) or [] if word.startswith("${") and word.endswith("}") else [word]
        commands.append(command)
    return commands


def test_the_seed_sweep_s_commands_run_train(tmp_path):
    """configs/sweep-seeds.yaml: the four CIFAR ResNets x five seeds, each a `resnetdist train`
    whose settings the CLI takes as they come (here --dry-run, without W&B)."""
    import yaml

    path = REPO / "configs" / "sweep-seeds.yaml"
    assert yaml.safe_load(path.read_text())["metric"]["name"] == "eval/test_error"  # the name runs log
    commands = sweep_commands(path)
    assert len(commands) == 20
    assert commands[0] == ["/usr/bin/env", "resnetdist", "train", "model.n=3", "train.seed=0"]
    seen = set()
    for command in (commands[0], commands[-1]):
        out = tmp_path / "run"
        shown = cli_in_process([*command[2:], "--device", "cpu", "--out", str(out), "--dry-run"]).stdout
        net = next(line.split()[1] for line in shown.splitlines() if line.strip().startswith("net "))
        seed = next(line for line in shown.splitlines() if line.startswith("seed = "))
        seen.add((net, seed))
    assert seen == {("ResNet-20", "seed = 0"), ("ResNet-56", "seed = 4")}


def test_choices_are_listed_checked_and_completed():
    from typer.testing import CliRunner

    from resnetdist.cli import app

    help_text = cli_in_process(["train", "-h"]).stdout
    for choices in ("auto|cpu|cuda", "resident|ffcv", "A|B"):
        assert choices in help_text, choices
    assert "local|slurm" in cli_in_process(["reproduce", "-h"]).stdout
    bad = cli_in_process(["train", "--device", "gpu", "--dry-run"], check=False)
    assert bad.exit_code == 2 and "--device" in bad.stderr and "'gpu' is not one of 'auto'," in bad.stderr

    def complete(words: str) -> list[str]:  # what bash gets back for the words typed so far
        env = {"_RESNETDIST_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
        result = CliRunner().invoke(app, [], prog_name="resnetdist", env=env)
        return result.stdout.split()

    assert complete("resnetdist train --device ") == ["auto", "cpu", "cuda"]
    assert complete("resnetdist reproduce --launcher ") == ["local", "slurm"]
    assert {"--depth", "--device", "--dry-run"} <= set(complete("resnetdist train --d"))
    assert "--install-completion" in cli_in_process(["-h"]).stdout


def test_the_header_says_the_warm_up_and_when_a_short_run_evaluates():
    from resnetdist.config import load_config
    from resnetdist.training.announce import facts
    from resnetdist.training.plan import resolve
    from resnetdist.rundir import StartPoint

    def iterations(flags, iters, overrides=()):
        cfg = load_config(None, flags, list(overrides), iters)
        return dict(facts(cfg, resolve(cfg, 1), StartPoint()))["iterations"]

    # ResNet-110's warm-up is in the header, and a short run keeps it (it used to become 1 iteration)
    assert iterations({"model": {"n": 18}}, 200) == (
        "200 (lr 0.01 for the first 100 iterations (warm-up), then 0.1, /10 at 100, 150; "
        "evaluation and checkpoint every 100)")
    assert "lr 0.01 for the first 400 iterations (warm-up), then 0.1, /10 at 32,000, 48,000; evaluation every " \
           "2,000, checkpoint every 4,000" in iterations({"model": {"n": 18}}, None)
    # a 60-iteration run evaluates and checkpoints at its end, not "every 100"
    assert iterations({"model": {"n": 1}}, 60).endswith("lr 0.1, /10 at 30, 45; evaluation and checkpoint at the end)")
    assert iterations({"model": {"n": 1}}, 250, ["train.eval_every=100", "train.checkpoint_every=500"]).endswith(
        "evaluation every 100 and at the end, checkpoint at the end)")


def test_a_first_ctrl_c_says_where_the_run_stops_and_the_end_is_said_once(capsys):
    from resnetdist.training.bar import RunBar
    from resnetdist.training.loop import Cadence

    def bar(total, log_every, eval_every):
        cadence = Cadence(total, log_every, eval_every, eval_every)
        return RunBar("r", total, 0, main=True, next_stop=cadence.next_stop)

    short = bar(60, 100, 100)  # a 60-iteration run: its only stop is its end
    short.tick(20)
    said = short.stopping()
    assert said.startswith("the run's next stop is its end, iteration 60 (about ")
    assert said.endswith("it finishes there (final evaluation, model.pt)")
    short.close()
    mid = bar(300, 50, 20)  # the loop stops at log and evaluation points alike: 40 comes first
    mid.tick(25)
    assert mid.stopping().startswith("stopping at iteration 40 to write a checkpoint (about ")
    mid.to(300)
    mid.to(300)  # piped output (no bar) used to print the line at every call
    mid.close()
    assert capsys.readouterr().out.count("iteration 300 done: final evaluation") == 1
