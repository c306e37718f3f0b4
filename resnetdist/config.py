"""One run's configuration: a small dataclass per concern, composed into RunConfig; loaded
from TOML (configs/*.toml) plus `--set section.key=value` overrides.

Order of precedence: dataclass defaults < --config file < CLI flags < --set. Everything is
checked (unknown section or key, wrong type, impossible value) before any worker starts, and
the error names the key at fault. The recipe's "auto" (warm-up) and the old spellings
(data.loader = "gpu") are resolved here; what depends on the machine (device, precision,
step, W&B mode) by its owner, in train/resolve.py, so config.toml in the run directory
records what ran.

This module imports nothing from the package: every other module may import it.
"""

from __future__ import annotations

import dataclasses
import json
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

    exit_code = 2  # errors.BAD_INPUT (config imports nothing of the package; errors.py lists it)


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
    iters: int = PAPER_ITERS
    milestones: list[int] = field(default_factory=lambda: [32_000, 48_000])
    gamma: float = 0.1  # lr factor at each milestone
    warmup_iters: int = -1  # lr = warmup_lr for the first warmup_iters; -1: 400 for n >= 18, else 0
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


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # run directory; "" = runs/<name>
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
) -> RunConfig:
    """Defaults < file < flags < --set, checked. Device, precision, step and W&B mode stay as
    given ("auto" stays "auto") until train/resolve.resolve, once, on the machine that trains
    (a Slurm suite's runs resolve them on their own nodes)."""
    cfg = RunConfig()
    if config_file is not None:
        merge(cfg, read_toml(config_file), str(config_file))
    if flags:
        merge(cfg, flags, "command line")
    for text in overrides or []:
        merge(cfg, parse_override(text), f"--set {text}")
    resolve_recipe(cfg)
    if iters is not None:
        scale_schedule(cfg, iters)
    cfg.validate()
    return cfg


# ----- resolving "auto" ---------------------------------------------------------------------------


def resolve_recipe(cfg: RunConfig) -> None:
    """The values whose default depends on other keys, the same on every machine."""
    if cfg.optim.warmup_iters < 0:
        # The paper warms ResNet-110 up at lr 0.01 for ~400 iterations; shallower nets need none.
        cfg.optim.warmup_iters = 400 if cfg.model.n >= 18 else 0
    cfg.data.loader = LOADER_ALIASES.get(cfg.data.loader, cfg.data.loader)


def scale_schedule(cfg: RunConfig, iters: int) -> None:
    """--iters N: shorten (or lengthen) the run, moving the lr milestones in proportion."""
    if iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    old = cfg.optim.iters
    cfg.optim.milestones = [max(1, round(m * iters / old)) for m in cfg.optim.milestones]
    cfg.optim.warmup_iters = min(cfg.optim.warmup_iters, iters)
    cfg.optim.iters = iters


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
