
import pytest

from resnetdist.config import ConfigError, load_config, parse_override, read_toml
from resnetdist.training.plan import resolve
from resnetdist.config import OptimConfig
from resnetdist.training.schedule import lr_at

from .conftest import REPO, cli_in_process

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def test_every_shipped_config_loads():
    names = {p.stem for p in CONFIGS}
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
            "plain20", "plain32", "plain44", "plain56", "seed-repo"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.optim.iters == 64_000 and cfg.optim.milestones == [32_000, 48_000]


def test_config_depths_and_presets():
    assert load_config(REPO / "configs/resnet110.toml").optim.warmup_iters == 400
    assert load_config(REPO / "configs/resnet56.toml").model.depth == 56
    assert load_config(REPO / "configs/plain44.toml").model.plain
    seed = load_config(REPO / "configs/seed-repo.toml")
    assert seed.optim.batch_size == 100 and seed.data.mean == "channel"
    assert seed.data.channel_mean == [125.0, 123.0, 114.0]


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert (cfg.model.n, cfg.model.plain, cfg.model.shortcut) == (3, False, "A")
    o = cfg.optim
    assert (o.batch_size, o.lr, o.momentum, o.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert o.warmup_iters == 0 and load_config(flags={"model": {"n": 18}}).optim.warmup_iters == 400


def test_lr_schedule_boundaries():
    o = OptimConfig(warmup_iters=0)
    assert lr_at(o, 0) == 0.1 and lr_at(o, 31_999) == 0.1
    assert lr_at(o, 32_000) == pytest.approx(0.01) and lr_at(o, 47_999) == pytest.approx(0.01)
    assert lr_at(o, 48_000) == pytest.approx(0.001) and lr_at(o, 63_999) == pytest.approx(0.001)
    warm = OptimConfig(warmup_iters=400)
    assert lr_at(warm, 399) == 0.01 and lr_at(warm, 400) == 0.1


def test_linear_scaling_rule_ramps_up():
    o = OptimConfig(warmup_iters=0)
    assert lr_at(o, 0, world_scale=4, scale_warmup=100) == pytest.approx(0.1 * (1 + 3 * 0.01))
    assert lr_at(o, 99, world_scale=4, scale_warmup=100) == pytest.approx(0.4)
    assert lr_at(o, 40_000, world_scale=4, scale_warmup=100) == pytest.approx(0.04)


def test_iters_scales_milestones():
    cfg = load_config(iters=640)
    assert cfg.optim.iters == 640 and cfg.optim.milestones == [320, 480]


# ----- precedence: what is set explicitly is never changed by another flag -------------------------


def schedule(cfg):
    return (cfg.optim.iters, cfg.optim.milestones, cfg.optim.warmup_iters, cfg.train.eval_every,
            cfg.train.checkpoint_every)


def test_iters_keeps_milestones_given_with_set():
    """The issue's cases: --iters used to rescale these ([31, 47]; lr 0.001 from iteration 1)."""
    cfg = load_config(iters=2000, overrides=["optim.milestones=[1000,1500]"])
    assert cfg.optim.milestones == [1000, 1500]
    cfg = load_config(iters=20, overrides=["optim.milestones=[5,15]"])
    assert cfg.optim.milestones == [5, 15]
    assert [lr_at(cfg.optim, i) for i in (0, 4, 5, 15)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_validation_runs_on_the_final_config():
    with pytest.raises(ConfigError, match=r"optim.milestones must be increasing.*\[15, 5\]"):
        load_config(iters=20, overrides=["optim.milestones=[15,5]"])
    with pytest.raises(ConfigError, match=r"optim.milestones \[1000, 2000\]: 2000 is at or past the end of the run "
                                          r"\(optim.iters = 2000\)"):
        load_config(iters=2000, overrides=["optim.milestones=[1000,2000]"])
    with pytest.raises(ConfigError, match="--iters must be >= 1"):
        load_config(iters=0)


def test_iters_given_with_set_moves_the_defaults_like_the_flag():
    """--set optim.iters=2000 used to keep milestones [32000, 48000], past the end, silently."""
    assert schedule(load_config(overrides=["optim.iters=2000"])) == schedule(load_config(iters=2000))
    assert schedule(load_config(iters=2000)) == (2000, [1000, 1500], 0, 100, 100)
    assert schedule(load_config(iters=2000, overrides=["optim.iters=3000"]))[:2] == (3000, [1500, 2250])


def test_milestones_past_the_end_are_refused_whichever_way_they_were_given(tmp_path):
    lone = tmp_path / "lone.toml"  # milestones without a run length: iterations, kept as written
    lone.write_text("[optim]\nmilestones = [1000, 3000]\n")
    with pytest.raises(ConfigError, match=r"3000 is at or past the end of the run \(optim.iters = 2000\)"):
        load_config(lone, iters=2000)
    assert load_config(lone).optim.milestones == [1000, 3000]  # the paper's length: fine


def test_a_config_files_schedule_moves_with_a_new_length(tmp_path):
    """A file that gives optim.iters wrote its schedule for that length (the shipped configs:
    64k); --iters or --set optim.iters moves it in proportion, but for the warm-up (iterations, at most half)."""
    path = REPO / "configs/resnet110.toml"
    assert schedule(load_config(path)) == (64_000, [32_000, 48_000], 400, 2000, 4000)
    assert schedule(load_config(path, iters=2000)) == (2000, [1000, 1500], 400, 100, 100)  # the warm-up: not scaled
    assert schedule(load_config(path, overrides=["optim.iters=2000"])) == schedule(load_config(path, iters=2000))
    short = tmp_path / "short.toml"
    short.write_text("[optim]\niters = 1000\nmilestones = [500, 900]\n[train]\neval_every = 250\n")
    assert schedule(load_config(short))[:4] == (1000, [500, 900], 0, 250)
    assert schedule(load_config(short, iters=2000))[:4] == (2000, [1000, 1800], 0, 500)


def test_explicit_warmup_and_cadence_are_kept():
    cfg = load_config(flags={"model": {"n": 18}}, iters=2000,
                      overrides=["optim.warmup_iters=300", "train.eval_every=7", "train.checkpoint_every=500"])
    assert schedule(cfg) == (2000, [1000, 1500], 300, 7, 500)
    # the default warm-up keeps the paper's 400 iterations, at most half the run: at --iters 200 it used
    # to become 1 iteration, silently (no warm-up at all)
    assert load_config(flags={"model": {"n": 18}}, iters=2000).optim.warmup_iters == 400
    assert load_config(flags={"model": {"n": 18}}, iters=200).optim.warmup_iters == 100
    assert load_config(REPO / "configs/resnet110.toml", iters=200).optim.warmup_iters == 100
    assert load_config(flags={"model": {"n": 18}}, iters=200, overrides=["optim.warmup_iters=150"]).optim.warmup_iters == 150


def test_cadence_scales_with_the_run_length():
    """A 2,000-iteration run evaluates and checkpoints several times (it used to do neither
    before its end: 2000 / 4000); the paper's 64k keeps 2000 / 4000; cadences land on log points."""
    assert schedule(load_config()) == (64_000, [32_000, 48_000], 0, 2000, 4000)
    cfg = load_config(iters=2000)
    assert 2000 // cfg.train.eval_every >= 5 and 2000 // cfg.train.checkpoint_every >= 5
    cfg = load_config(iters=300, overrides=["log.log_every=10"])
    assert (cfg.train.eval_every, cfg.train.checkpoint_every) == (10, 20)
    assert cfg.train.eval_every % cfg.log.log_every == 0


def test_overrides_keep_types():
    assert parse_override("optim.lr=0.05") == {"optim": {"lr": 0.05}}
    assert parse_override("optim.milestones=[10, 20]") == {"optim": {"milestones": [10, 20]}}
    assert parse_override("data.loader=ffcv") == {"data": {"loader": "ffcv"}}
    cfg = load_config(overrides=["optim.lr=1", "model.plain=true"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.model.plain


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "unknown key optim.lrr"),
    ("optimizer.lr=0.1", r"unknown section \[optimizer\]"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("model.n=2.5", "model.n: expected int"),
    ("model.plain=1", "model.plain: expected bool"),
    ("model.n=0", "model.n must be >= 1"),
    ("model.shortcut=C", "model.shortcut must be 'A' or 'B'"),
    ("optim.milestones=[48000, 32000]", "optim.milestones must be increasing"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("data.loader=tfds", "data.loader must be one of"),
    ("nokey", "expected section.key=value"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn = 3\ndepth = 20\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key model.depth"):
        load_config(bad)
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_cli_refuses_bad_input_before_anything_runs(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = cli_in_process(["train", "--data-dir", str(tiny_data), "--out", str(out), "--set", "optim.momentum=2"],
                          check=False)
    assert proc.exit_code == 2 and "optim.momentum" in proc.stderr
    assert not out.exists()
    proc = cli_in_process(["train", "--data-dir", str(tmp_path / "nope"), "--out", str(out)], check=False)
    assert proc.exit_code == 2 and "nope: no such folder" in proc.stderr
    assert not out.exists()


def test_configs_for_other_machines_keep_auto():
    """A Slurm suite writes its runs' configs on the login node; the nodes resolve device,
    precision and W&B mode themselves."""
    cfg = load_config(flags={"model": {"n": 18}})
    assert (cfg.train.device, cfg.train.precision, cfg.log.wandb_mode) == ("auto", "auto", "auto")
    assert cfg.optim.warmup_iters == 400  # the recipe is resolved
    here = resolve(cfg, 1)
    assert here.device in ("cpu", "cuda") and here.precision != "auto" and cfg.train.device == "auto"


def test_train_step_resolution(monkeypatch):
    """train.step alone decides the step that runs (step.choose_kind); train.compile is only the
    compile step's mode."""
    from resnetdist.training.step import choose_kind

    assert choose_kind("auto", True, "bf16").kind == "graph"  # the fast path by default on a GPU
    assert choose_kind("auto", True, "fp16").kind == "eager" and "fp16" in choose_kind("auto", True, "fp16").reason
    assert choose_kind("auto", False, "fp32").reason == "auto: no CUDA device, so no CUDA graph"
    assert choose_kind("compile", True, "bf16").kind == "compile"
    assert choose_kind("eager", True, "bf16").kind == "eager"
    with pytest.raises(ConfigError, match="train.step = graph needs a CUDA device"):
        choose_kind("graph", False, "fp32")  # asked for by name: it runs or the run stops
    with pytest.raises(ConfigError, match="train.step = graph needs a CUDA device"):
        resolve(load_config(overrides=["train.device=cpu", "train.step=graph"]), 1)  # at preflight, before workers
    cfg = load_config(overrides=["train.device=cpu", "train.compile=max-autotune"])
    plan = resolve(cfg, 1)
    assert (plan.step, plan.step_asked, cfg.train.compile) == ("eager", "auto", "max-autotune")  # compile asks for no kind
    assert cfg.train.step == "auto"  # the configuration stays as asked
    with pytest.raises(ConfigError, match="train.step must be one of"):
        load_config(overrides=["train.step=fast"])
    with pytest.raises(ConfigError, match="does not support fp16"):
        load_config(overrides=["train.step=graph", "train.precision=fp16", "train.device=cuda"])


def test_pre_release_spellings_are_refused_like_any_unknown_key_or_value():
    with pytest.raises(ConfigError, match="unknown key train.cuda_graph"):
        load_config(overrides=["train.cuda_graph=true"])
    with pytest.raises(ConfigError, match="data.loader must be one of"):
        load_config(flags={"data": {"loader": "gpu"}})
    with pytest.raises(ConfigError, match="train.compile must be one of"):
        load_config(overrides=["train.compile=none"])


def test_config_toml_without_tomli_w_round_trips(monkeypatch):
    from resnetdist import config

    cfg = load_config(overrides=['log.name="a \\"quoted\\" name"', "log.wandb_tags=[\"x\", \"y\"]"])
    monkeypatch.setattr(config, "tomli_w", None)
    text = config.to_toml(cfg)
    assert config.tomllib.loads(text) == cfg.to_dict()


def test_the_configuration_page_is_generated_from_the_dataclasses():
    """docs/configuration.md is what `python -m resnetdist.configdoc` prints: every key, its
    default and its description, so the page cannot drift from config.py."""
    import dataclasses

    from resnetdist.config import RunConfig
    from resnetdist.configdoc import render

    cfg = RunConfig()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no description (config.key)"
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == render(), "docs/configuration.md is stale: python -m resnetdist.configdoc > docs/configuration.md"
    assert "| `train.step` | `\"auto\"` |" in page and "| `log.wandb_finish_timeout_s` | `300` |" in page


# ----- train --dry-run ---------------------------------------------------------------------------


def test_dry_run_prints_the_resolved_config_and_what_would_run_and_writes_nothing(tmp_path, tiny_data, monkeypatch):
    from resnetdist.config import tomllib

    monkeypatch.setenv("WANDB_MODE", "disabled")  # as cli_in_process runs it
    out = tmp_path / "run"
    proc = cli_in_process(["train", "-n", "1", "--device", "cpu", "--iters", "2000", "--data-dir", str(tiny_data),
                           "--out", str(out), "--set", "optim.milestones=[500,1500]", "--dry-run"])
    assert proc.exit_code == 0 and not out.exists()
    toml_text, _, plan = proc.stdout.partition("would run")
    shown = tomllib.loads(toml_text)
    resolved = shown.pop("resolved")  # what this machine made of it, apart from the configuration
    expected = load_config(flags={"model": {"n": 1}, "train": {"device": "cpu", "out": str(out)},
                                  "data": {"dir": str(tiny_data)}},
                           overrides=["optim.milestones=[500,1500]"], iters=2000).to_dict()
    assert shown == expected and shown["optim"]["milestones"] == [500, 1500]
    assert (resolved["device"], resolved["precision"], resolved["step"], resolved["batch_per_rank"]) == (
        "cpu", "fp32", "eager", 128)
    for fact in ("net             ResNet-8 (75,290 parameters)", "device          cpu, 1 rank", "precision       fp32",
                 "step            eager", "loader          resident", "iterations      2,000",
                 "batch per rank  128", f"run directory   {out}", "start           fresh start"):
        assert fact in plan, plan
    # bad input is refused as a real run refuses it: exit 2, one line, nothing written
    proc = cli_in_process(["train", "--iters", "100", "--set", "optim.milestones=[50,100]", "--out", str(out),
                           "--dry-run"], check=False)
    assert proc.exit_code == 2 and "optim.milestones [50, 100]: 100 is at or past the end" in proc.stderr
    assert not out.exists()
