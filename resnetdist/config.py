"""One run's configuration: a small dataclass per concern, composed into RunConfig; loaded
from TOML (configs/*.toml) plus `--set section.key=value` overrides.

Order of precedence: dataclass defaults < --config file < CLI flags < --set. Everything is
checked (unknown section or key, wrong type, impossible value) before any worker starts, and
the error names the key at fault. Every "auto" (device, precision, CUDA graph, W&B mode,
warm-up) is resolved here, once, so config.toml in the run directory records what ran.

This module imports nothing from the package: every other module may import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # tomli-w is small but absent from stock PyTorch images: a fallback writer is below
    import tomli_w
except ModuleNotFoundError:
    tomli_w = None

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PAPER_ITERS = 64_000  # the paper's schedule: 64k iterations, lr /10 at 32k and 48k
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "max-autotune")
STEPS = ("auto", "graph", "compile", "eager")  # train.step; auto: graph on CUDA (bf16/fp32), else eager
LOADERS = ("resident", "ffcv")
LOADER_ALIASES = {"gpu": "resident"}  # the resident loader's old name; configs that say "gpu" still run
BATCH_SCALING = ("split", "per_rank")
WANDB_MODES = ("auto", "online", "offline", "disabled")


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names it."""


def model_name(n: int, plain: bool) -> str:
    """resnet20, plain56, ...: the name of the (6n+2)-layer net."""
    return f"{'plain' if plain else 'resnet'}{6 * n + 2}"


def depth_to_n(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"--depths: {depth} is not 6n+2 for some n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
    return (depth - 2) // 6


# ----- the sections -----------------------------------------------------------------------------


@dataclass
class ModelConfig:
    n: int = 3  # blocks per stage; depth = 6n + 2
    plain: bool = False  # True: no shortcuts (the paper's "plain" baselines)
    shortcut: str = "A"  # A: identity + zero-padded channels (paper's CIFAR choice); B: 1x1 projection
    num_classes: int = 10

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"model.n must be >= 1, got {self.n}")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"model.shortcut must be 'A' or 'B', got {self.shortcut!r}")
        if self.num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {self.num_classes}")

    @property
    def depth(self) -> int:
        return 6 * self.n + 2

    @property
    def name(self) -> str:
        return model_name(self.n, self.plain)


@dataclass
class DataConfig:
    dir: str = ""  # folder with cifar-10-batches-bin/ or the tarball; "" = download to the cache
    loader: str = "resident"  # resident: the dataset on the training device | ffcv: .beton files
    beton_dir: str = ""  # where the .beton files live; "" = <data dir>/beton
    ffcv_workers: int = 4
    val_split: bool = False  # hold out 5k training images (the paper's 45k/5k protocol)
    mean: str = "pixel"  # pixel: per-pixel mean image of the training set; channel: channel_mean
    channel_mean: list[float] = field(default_factory=lambda: [125.3, 123.0, 113.9])
    eval_batch: int = 1000

    def validate(self) -> None:
        if self.loader not in LOADERS and self.loader not in LOADER_ALIASES:
            raise ValueError(f"data.loader must be one of {LOADERS}, got {self.loader!r}")
        if self.mean not in ("pixel", "channel"):
            raise ValueError(f"data.mean must be 'pixel' or 'channel', got {self.mean!r}")
        if len(self.channel_mean) != 3:
            raise ValueError(f"data.channel_mean needs 3 values, got {self.channel_mean}")
        if self.eval_batch < 1 or self.ffcv_workers < 1:
            raise ValueError("data.eval_batch and data.ffcv_workers must be >= 1")


@dataclass
class OptimConfig:
    batch_size: int = 128  # global batch (see dist.batch_scaling)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # length of the run; --iters N sets it. Milestones, warm-up and the evaluation and checkpoint
    # cadence written for another length (the defaults, a config file's values given with its
    # optim.iters) move in proportion; values given without a length (--set) are kept as written
    iters: int = PAPER_ITERS
    # lr steps (iterations); each must fall before optim.iters (one at or past the end is refused)
    milestones: list[int] = field(default_factory=lambda: [32_000, 48_000])
    gamma: float = 0.1  # lr factor at each milestone
    # lr = warmup_lr for the first warmup_iters; -1: 400 of 64k iterations (in proportion) for n >= 18, else 0
    warmup_iters: int = -1
    warmup_lr: float = 0.01

    def validate(self) -> None:
        if self.batch_size < 1 or self.iters < 1:
            raise ValueError("optim.batch_size and optim.iters must be >= 1")
        if self.lr <= 0 or self.warmup_lr <= 0:
            raise ValueError(f"optim.lr and optim.warmup_lr must be > 0, got {self.lr}, {self.warmup_lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise ValueError("optim.momentum must be in [0, 1), weight_decay >= 0, gamma in (0, 1]")
        if sorted(self.milestones) != self.milestones or any(m < 1 for m in self.milestones):
            raise ValueError(f"optim.milestones must be increasing positive iterations, got {self.milestones}")
        if self.milestones and self.milestones[-1] >= self.iters:
            # an lr step at or past the end never happens: the run would not be the schedule asked for
            raise ValueError(
                f"optim.milestones {self.milestones}: {self.milestones[-1]} is at or past the end of the run "
                f"(optim.iters = {self.iters}); give milestones below {self.iters}, or leave optim.milestones "
                f"unset so that the paper's move with the run length")


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # run directory; "" = runs/<name>
    # iterations between evaluations / checkpoints: 2000 / 4000 of the paper's 64k, in proportion
    # for other lengths (multiples of log.log_every: 100 / 100 for a 2,000-iteration run)
    eval_every: int = 2_000
    checkpoint_every: int = 4_000
    keep_checkpoints: int = 3
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    channels_last: bool = True  # used on CUDA only
    # auto: the fastest verified step here (graph on CUDA with bf16/fp32; eager on the CPU and for
    # fp16, whose loss scaler syncs with the host) | graph: the whole step captured once as a CUDA
    # graph and replayed | compile: torch.compile of the model, eager step | eager
    step: str = "auto"
    compile: str = "none"  # none | default | max-autotune: torch.compile mode (step = compile: default)
    cuda_graph: bool = False  # old spelling of step = "graph"; kept equal to it once resolved

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if min(self.eval_every, self.checkpoint_every, self.keep_checkpoints) < 1:
            raise ValueError("train.eval_every, checkpoint_every and keep_checkpoints must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.step not in STEPS:
            raise ValueError(f"train.step must be one of {STEPS}, got {self.step!r}")
        if (self.cuda_graph or self.step == "graph") and self.precision == "fp16":
            raise ValueError("train.step = graph does not support fp16 (its loss scaler syncs with the host); use bf16")


@dataclass
class DistConfig:
    # split: optim.batch_size is the global batch, divided across ranks (the paper's 128 on
    # any number of GPUs). per_rank: every rank takes optim.batch_size, the global batch grows
    # with the world size and the lr is scaled linearly with a warm-up (Goyal et al. 2017).
    batch_scaling: str = "split"
    scale_warmup_iters: int = 500
    sync_bn: bool = False
    timeout_s: int = 600  # process-group init and every collective

    def validate(self) -> None:
        if self.batch_scaling not in BATCH_SCALING:
            raise ValueError(f"dist.batch_scaling must be one of {BATCH_SCALING}, got {self.batch_scaling!r}")
        if self.timeout_s < 1 or self.scale_warmup_iters < 0:
            raise ValueError("dist.timeout_s must be >= 1 and dist.scale_warmup_iters >= 0")


@dataclass
class LogConfig:
    name: str = ""  # run name; "" = <model>-s<seed>, e.g. resnet20-s0
    log_every: int = 100  # iterations between train-loss records (TensorBoard / W&B, progress)
    tensorboard: bool = True
    wandb_mode: str = "auto"  # auto: online when logged in or WANDB_API_KEY is set, else offline
    wandb_project: str = ""  # "" = $WANDB_PROJECT or "resnetdist"
    wandb_entity: str = ""  # "" = $WANDB_ENTITY or your default entity
    wandb_group: str = ""  # "" = the model name, so seeds of one net group together (reproduce: the suite)
    wandb_job_type: str = ""  # "" = the model name, so a suite's runs can be told apart by net
    wandb_tags: list[str] = field(default_factory=list)
    wandb_init_timeout_s: int = 60  # online init gives up after this, and the run goes on offline
    wandb_finish_timeout_s: int = 300  # upload wait at the end; the rest stays on disk for `wandb sync`

    def validate(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"log.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if self.log_every < 1:
            raise ValueError(f"log.log_every must be >= 1, got {self.log_every}")
        if self.wandb_init_timeout_s < 1 or self.wandb_finish_timeout_s < 1:
            raise ValueError("log.wandb_init_timeout_s and log.wandb_finish_timeout_s must be >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def name(self) -> str:
        return self.log.name or f"{self.model.name}-s{self.train.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out) if self.train.out else Path("runs") / self.name

    @property
    def tags(self) -> list[str]:
        m = self.model
        return [m.name, "plain" if m.plain else "resnet", f"seed{self.train.seed}", f"depth{m.depth}"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            try:
                getattr(self, section.name).validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.optim.warmup_iters > self.optim.iters:
            raise ConfigError(
                f"optim.warmup_iters ({self.optim.warmup_iters}) exceeds optim.iters ({self.optim.iters})"
            )


# ----- reading and merging ------------------------------------------------------------------------


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _merge_section(obj: Any, section: str, values: dict[str, Any], source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"{source}: unknown key {section}.{key} (known: {known})")
        setattr(obj, key, _check_type(f"{source}: {section}.{key}", value, hints[key]))


def merge(cfg: RunConfig, tree: dict[str, Any], source: str) -> None:
    """Apply a {section: {key: value}} tree onto cfg, checking names and types."""
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in tree.items():
        if section not in sections:
            raise ConfigError(
                f"{source}: unknown section [{section}] (known: {', '.join(sorted(sections))})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {values!r}")
        _merge_section(getattr(cfg, section), section, values, source)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def parse_override(text: str) -> dict[str, Any]:
    """'section.key=value' -> {section: {key: value}}; the value is read as TOML (so 0.1, 3,
    true, [1, 2] and "s" keep their types), and a bare word falls back to a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section: {key: value}}


def load_config(
    config_file: Path | None = None,
    flags: dict[str, dict[str, Any]] | None = None,
    overrides: list[str] | None = None,
    iters: int | None = None,
    for_this_machine: bool = True,
) -> RunConfig:
    """Defaults < file < flags (--iters among them: it sets optim.iters) < --set, checked on the
    final values. The schedule (milestones, warm-up, evaluation and checkpoint cadence) moves
    with the run length only where it was written for another length (scale_schedule); a value
    given on its own is kept as written. for_this_machine=False leaves device, precision, graph
    and W&B mode as given ("auto" stays "auto"): for configs written here to be trained
    elsewhere (a Slurm suite's runs resolve them on their own nodes)."""
    if iters is not None and iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    cfg = RunConfig()
    sources: list[tuple[dict[str, Any], str]] = [(cfg.to_dict(), "defaults")]
    if config_file is not None:
        sources.append((read_toml(config_file), str(config_file)))
    command_line = {section: dict(values) for section, values in (flags or {}).items()}
    if iters is not None:
        command_line.setdefault("optim", {})["iters"] = iters
    if command_line:
        sources.append((command_line, "command line"))
    sources += [(parse_override(text), f"--set {text}") for text in overrides or []]
    for tree, source in sources[1:]:
        merge(cfg, tree, source)
    scale_schedule(cfg, schedule_lengths(sources))
    resolve_recipe(cfg)
    if for_this_machine:
        for note in resolve_machine(cfg):
            if os.environ.get("RANK", "0") == "0":  # once per job, not once per rank
                print(f"note: {note}", file=sys.stderr, flush=True)
    cfg.validate()
    return cfg


# ----- resolving "auto" ---------------------------------------------------------------------------


def resolve_recipe(cfg: RunConfig) -> None:
    """The values whose default depends on other keys, the same on every machine."""
    if cfg.optim.warmup_iters < 0:
        # The paper warms ResNet-110 up at lr 0.01 for ~400 iterations; shallower nets need none.
        # (400 of the paper's 64k; a shorter run warms up for the same share of it)
        warmup = max(1, round(400 * cfg.optim.iters / PAPER_ITERS))
        cfg.optim.warmup_iters = min(warmup, cfg.optim.iters) if cfg.model.n >= 18 else 0
    cfg.data.loader = LOADER_ALIASES.get(cfg.data.loader, cfg.data.loader)


def resolve_machine(cfg: RunConfig) -> list[str]:
    """Replace every "auto" that depends on this machine by what will run here; returns notes
    for the user about settings that cannot apply here."""
    import torch

    notes = []
    if cfg.train.device == "auto":
        cfg.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = cfg.train.device == "cuda"
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    notes += resolve_step(cfg.train, on_cuda)
    cfg.log.wandb_mode = resolve_wandb_mode(cfg.log.wandb_mode)
    return notes


def resolve_step(train: TrainConfig, on_cuda: bool) -> list[str]:
    """train.step "auto" (and the old train.cuda_graph / train.compile spellings) -> the step
    that will run; train.cuda_graph and train.compile are set to agree with it."""
    notes = []
    if train.step == "auto" and train.cuda_graph:
        train.step = "graph"
    elif train.step == "auto" and train.compile != "none":
        train.step = "compile"
    elif train.step == "auto":
        # measured on an H100 (DESIGN.md): the whole-step graph is 4x the eager step at batch 128;
        # fp16 stays eager (validate refuses graph + fp16)
        train.step = "graph" if on_cuda and train.precision in ("bf16", "fp32") else "eager"
    if train.step == "graph" and not on_cuda:
        notes.append(f"train.step = graph needs CUDA; the step runs eagerly on {train.device}")
        train.step = "eager"
    if train.step == "compile" and train.compile == "none":
        train.compile = "default"
    if train.step == "eager":
        train.compile = "none"
    train.cuda_graph = train.step == "graph"
    return notes


def resolve_wandb_mode(mode: str) -> str:
    """auto -> $WANDB_MODE when set, else online when logged in, else offline. An explicit
    log.wandb_mode (online/offline/disabled) wins over the environment."""
    if mode != "auto":
        return mode
    env = wandb_env_mode()
    if env in ("online", "offline", "disabled", "shared"):
        return "online" if env == "shared" else env
    return "online" if wandb_logged_in() else "offline"


def wandb_env_mode() -> str | None:
    """The mode asked for by WANDB_MODE / WANDB_DISABLED, normalised; None when unset."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return {"dryrun": "offline", "run": "online"}.get(mode, mode) if mode else None


def wandb_logged_in() -> bool:
    """An API key in the environment, or `wandb login` having stored one in ~/.netrc for the
    server in use. Decided locally: nothing is sent over the network."""
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.is_file() and host in netrc.read_text(errors="ignore")
    except OSError:
        return False


# Values counted in iterations of a run: written for one run length (the defaults and the
# shipped configs for the paper's 64k), they move in proportion when the length changes.
SCHEDULE_KEYS = ("optim.milestones", "optim.warmup_iters", "train.eval_every", "train.checkpoint_every")


def schedule_lengths(sources: list[tuple[dict[str, Any], str]]) -> dict[str, int | None]:
    """For each schedule key, the run length it was written for: optim.iters as given by the
    source that set the key last (the defaults: 64k), or None when that source gave no length
    (a --set, a file without optim.iters): those values are iterations, kept as written."""
    lengths: dict[str, int | None] = {}
    for tree, _ in sources:
        for key in SCHEDULE_KEYS:
            section, name = key.split(".")
            if name in tree.get(section, {}):
                lengths[key] = tree.get("optim", {}).get("iters")
    return lengths


def scale_schedule(cfg: RunConfig, written_for: dict[str, int | None]) -> None:
    """Move each schedule value written for another run length to optim.iters, in proportion:
    milestones that would fall at or past the end are dropped, warm-up stays at least 1
    iteration if it had any, and the evaluation and checkpoint cadence are whole multiples of
    log.log_every (so evaluations land on log points; a 2,000-iteration run of the defaults
    evaluates and checkpoints every 100 iterations, the paper's 64k every 2000 / 4000)."""
    iters = cfg.optim.iters

    def moved(key: str, value: int) -> int | None:
        ref = written_for.get(key)
        return None if not ref or ref == iters or value <= 0 else max(1, round(value * iters / ref))

    o, t, every = cfg.optim, cfg.train, cfg.log.log_every
    if written_for.get("optim.milestones") not in (None, iters):
        o.milestones = [m for m in (moved("optim.milestones", m) for m in o.milestones) if m and m < iters]
    o.warmup_iters = min(moved("optim.warmup_iters", o.warmup_iters) or o.warmup_iters, iters)
    for key in ("eval_every", "checkpoint_every"):
        value = moved(f"train.{key}", getattr(t, key))
        if value is not None and every >= 1:
            setattr(t, key, max(every, round(value / every) * every))


# ----- run directories ----------------------------------------------------------------------------


def from_dict(tree: dict[str, Any], source: str) -> RunConfig:
    cfg = RunConfig()
    merge(cfg, tree, source)
    resolve_recipe(cfg)
    return cfg


def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(cfg.to_dict()) if tomli_w is not None else dumps_toml(cfg.to_dict())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf / nan are spelt the same in TOML
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps_toml(tree: dict[str, dict[str, Any]]) -> str:
    """A {section: {key: scalar or list}} tree as TOML, for machines without tomli-w (the
    config has no deeper nesting)."""
    out = []
    for section, values in tree.items():
        out.append(f"[{section}]")
        out += [f"{key} = {_toml_value(v)}" for key, v in values.items()]
        out.append("")
    return "\n".join(out)


def diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """(section.key, value in a, value in b) for every key whose values differ."""
    da, db = a.to_dict(), b.to_dict()
    return [
        (f"{section}.{key}", da[section][key], db[section][key])
        for section in da
        for key in da[section]
        if da[section][key] != db[section][key]
    ]


# What a run directory's results depend on: resuming with any of these changed would splice
# two different experiments into one curve, so it is refused. Everything else (logging,
# devices, loader, speed settings, world size) may change between restarts.
RESUME_KEYS = ("model", "optim", "train.seed", "data.val_split", "data.mean", "data.channel_mean",
               "dist.batch_scaling")


def check_run_dir(cfg: RunConfig) -> None:
    """Refuse to continue a run directory that holds a different experiment."""
    path = cfg.run_dir / "config.toml"
    if not path.exists():
        return
    old = from_dict(read_toml(path), str(path))
    changed = [
        f"{key}: {was!r} -> {now!r}"
        for key, was, now in diff(old, cfg)
        if key in RESUME_KEYS or key.split(".")[0] in RESUME_KEYS
    ]
    if changed:
        raise ConfigError(
            f"{cfg.run_dir} holds a run with a different configuration ({'; '.join(changed)}); "
            f"pass another --out, or delete that folder to start over"
        )
