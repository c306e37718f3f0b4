"""One run's configuration: a dataclass per section, composed into RunConfig; defaults <
--config file < CLI flags < --set, every key checked before any worker starts, the error naming
it. The recipe's "auto" (warm-up) is resolved here; what depends on the machine (device,
precision, step) by training/plan.resolve, into a record of its own: a configuration is never
rewritten after it is loaded. What may change between restarts (RESUME_KEYS) is decided here.

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
PAPER_WARMUP_ITERS = 400  # ResNet-110's warm-up at lr 0.01 ("about 400 iterations")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "max-autotune")  # train.compile: torch.compile's mode when train.step = compile
STEPS = ("auto", "graph", "compile", "eager")  # train.step; auto: graph on CUDA (bf16/fp32), else eager
LOADERS = ("resident", "ffcv")
DEVICES = ("auto", "cpu", "cuda")
SHORTCUTS = ("A", "B")  # model.shortcut: identity/zero-pad (the paper's CIFAR option) or 1x1 projection
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


def key(default: Any, text: str, *, least: int | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config key: its default, its description (metadata "doc": docs/configuration.md is
    generated from it, configdoc) and the rule its value keeps (Section.validate): at least
    `least`, or one of `choices`."""
    meta = {"doc": text, "least": least, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class Section:
    """A section of the configuration: each key checked against its own rule (key(least=,
    choices=)); a section's validate() adds the rules that tie several keys together."""

    def validate(self) -> None:
        section = type(self).__name__.removesuffix("Config").lower()  # ModelConfig -> model
        for f in dataclasses.fields(self):
            value, least, choices = getattr(self, f.name), f.metadata["least"], f.metadata["choices"]
            if choices and value not in choices:
                raise ConfigError(f"{section}.{f.name} must be one of {choices}, got {value!r}")
            if least is not None and value < least:
                raise ConfigError(f"{section}.{f.name} must be >= {least}, got {value}")


@dataclass
class ModelConfig(Section):
    n: int = key(3, "blocks per stage; depth 6n+2 (3 -> 20, 5 -> 32, 7 -> 44, 9 -> 56, 18 -> 110)", least=1)
    plain: bool = key(False, "no shortcuts (the paper's plain baselines)")
    shortcut: str = key("A", "A: identity, zero-padded channels where width doubles (paper); B: 1x1 projection there")
    num_classes: int = key(10, "classes of the last layer", least=2)

    def validate(self) -> None:
        super().validate()
        if self.shortcut not in SHORTCUTS:  # its own words: the paper's option names, quoted in docs and tests
            raise ConfigError(f"model.shortcut must be 'A' or 'B', got {self.shortcut!r}")

    @property
    def depth(self) -> int:
        return 6 * self.n + 2

    @property
    def name(self) -> str:
        return model_name(self.n, self.plain)


@dataclass
class DataConfig(Section):
    dir: str = key("",
        "folder with cifar-10-batches-bin/ or cifar-10-batches-py/ (torchvision's) or a tarball; \"\" downloads to "
        "the cache")
    loader: str = key("resident",
        "resident: the whole dataset on the training device; ffcv: .beton files through FFCV's Loader", choices=LOADERS)
    beton_dir: str = key("", 'where the .beton files live ("" = beton/ beside cifar-10-batches-bin/)')
    ffcv_workers: int = key(4, "FFCV decoding threads", least=1)
    val_split: bool = key(False, "hold out 5k of the 50k training images (the paper's 45k/5k protocol)")
    mean: str = key("pixel", "pixel: subtract the per-pixel mean image of the training set; channel: data.channel_mean",
                    choices=("pixel", "channel"))
    channel_mean: list[float] = key([125.3, 123.0, 113.9], "per-channel means, 0-255 units")
    eval_batch: int = key(1000, "evaluation batch", least=1)

    def validate(self) -> None:
        super().validate()
        if len(self.channel_mean) != 3:
            raise ConfigError(f"data.channel_mean needs 3 values, got {self.channel_mean}")


@dataclass
class OptimConfig(Section):
    batch_size: int = key(128, "global batch (see dist.batch_scaling)", least=1)
    lr: float = key(0.1, "SGD learning rate")
    momentum: float = key(0.9, "SGD momentum")
    weight_decay: float = key(1e-4, "SGD weight decay", least=0)
    iters: int = key(PAPER_ITERS,
        "length of the run; --iters N (or this key) sets it. Milestones and the evaluation and checkpoint cadence "
        "written for another length (the defaults, a config file's values given with its optim.iters) move in "
        "proportion (the warm-up keeps its length: optim.warmup_iters); values given without a length (--set) are "
        "kept as written", least=1)
    milestones: list[int] = key([32_000, 48_000],
        "iterations at which the lr is multiplied by gamma; each before optim.iters (one at or past the end is "
        "refused)")
    gamma: float = key(0.1, "lr factor at each milestone")
    warmup_iters: int = key(-1,
        "iterations at the constant warm-up lr; -1 = the paper's 400 for n >= 18 (ResNet-110, 1202), else none. Not "
        "scaled with optim.iters (it lasts until the net starts learning, whatever the run's length); the default, or "
        "a file's value written for another length, is at most half the run")
    warmup_lr: float = key(0.01, "the warm-up lr")

    def validate(self) -> None:
        super().validate()
        if self.lr <= 0 or self.warmup_lr <= 0:
            raise ConfigError(f"optim.lr and optim.warmup_lr must be > 0, got {self.lr}, {self.warmup_lr}")
        if not 0 <= self.momentum < 1 or not 0 < self.gamma <= 1:
            raise ConfigError(f"optim.momentum must be in [0, 1) and optim.gamma in (0, 1], got {self.momentum}, "
                             f"{self.gamma}")
        if sorted(self.milestones) != self.milestones or any(m < 1 for m in self.milestones):
            raise ConfigError(f"optim.milestones must be increasing positive iterations, got {self.milestones}")
        if self.milestones and self.milestones[-1] >= self.iters:
            # an lr step at or past the end never happens: the run would not be the schedule asked for
            raise ConfigError(f"optim.milestones {self.milestones}: {self.milestones[-1]} is at or past the end of the "
                             f"run (optim.iters = {self.iters}); give milestones below {self.iters}, or leave "
                             f"optim.milestones unset so that the paper's move with the run length")


@dataclass
class TrainConfig(Section):
    seed: int = key(0, "weights, data order and augmentation all derive from it")
    device: str = key("auto", "auto, cpu, cuda", choices=DEVICES)
    out: str = key("", 'run directory ("" = runs/<name>)')
    eval_every: int = key(2_000,
        "iterations between evaluations; the default moves with optim.iters (multiples of log.log_every: 100 for a "
        "2,000-iteration run)", least=1)
    checkpoint_every: int = key(4_000,
        "iterations between checkpoints; the default moves with optim.iters like eval_every", least=1)
    keep_checkpoints: int = key(3, "checkpoints kept in the run directory", least=1)
    precision: str = key("auto", "fp32, bf16, fp16; auto = bf16 on a GPU that has it, else fp32", choices=PRECISIONS)
    channels_last: bool = key(True, "NHWC memory format (CUDA only)")
    step: str = key("auto",
        "graph: the whole step captured once as a CUDA graph and replayed; compile: torch.compile of the model, eager "
        "step; eager. auto = graph on CUDA with bf16/fp32, else eager; a failed capture trains eagerly and "
        "resolved.toml / summary.json record what ran", choices=STEPS)
    compile: str = key("default",
        "torch.compile's mode for train.step = compile: default, max-autotune (other steps ignore it)",
        choices=COMPILE_MODES)

    def validate(self) -> None:
        super().validate()
        if self.step == "graph" and self.precision == "fp16":
            raise ConfigError("train.step = graph does not support fp16 (its loss scaler syncs with the host); use bf16")


HANG_TIMEOUT_FLOOR_S = 10


@dataclass
class DistConfig(Section):
    batch_scaling: str = key("split",
        "split: the global batch is divided across ranks; per_rank: every rank takes optim.batch_size, lr scaled by "
        "the world size after a linear warm-up (Goyal et al. 2017)", choices=BATCH_SCALING)
    scale_warmup_iters: int = key(500, "the per_rank lr warm-up, in iterations", least=0)
    sync_bn: bool = key(False, "SyncBatchNorm across ranks (CUDA)")
    # above hang_timeout_s (validate): on an eager collective the hang watchdog's one line and
    # exit 7 come before NCCL's own watchdog aborts the process
    timeout_s: int = key(900,
        "process-group init and every collective launched eagerly (NCCL's watchdog aborts after it); must be above "
        "dist.hang_timeout_s", least=1)
    # measured against progress, not the cadence: the longest healthy silence is one iteration,
    # evaluation batch or checkpoint write (dist.HangWatch); the floor keeps a typo (1 for 100)
    # from tripping it on a loaded CPU
    hang_timeout_s: int = key(300,
        "a rank that has made no progress (an iteration, an evaluation batch) for this long while waiting on other "
        "ranks reports the hang and exits 7, so torchrun restarts the job (0 = off; else >= 10 and below "
        "dist.timeout_s)")
    # a cold torch.compile takes 30-90 s on an H100, minutes in max-autotune; one that never
    # returns must still end the run
    compile_pause_s: int = key(1200,
        "the hang watchdog's clock pauses for a torch.compile compilation at most this long", least=0)

    def validate(self) -> None:
        super().validate()
        if self.hang_timeout_s != 0 and self.hang_timeout_s < HANG_TIMEOUT_FLOOR_S:
            raise ConfigError(f"dist.hang_timeout_s must be 0 (off) or >= {HANG_TIMEOUT_FLOOR_S}, "
                             f"got {self.hang_timeout_s}")
        if self.hang_timeout_s >= self.timeout_s:
            raise ConfigError(f"dist.hang_timeout_s ({self.hang_timeout_s}) must be below dist.timeout_s "
                             f"({self.timeout_s}), so that the hang watchdog reports a hang before NCCL's own "
                             f"watchdog aborts the process (defaults: 300 and 900)")


@dataclass
class LogConfig(Section):
    name: str = key("", 'run name ("" = <net>-s<seed>, e.g. resnet20-s0)')
    log_every: int = key(100, "iterations between train-loss records (TensorBoard, W&B, progress bar) and NaN checks",
                         least=1)
    tensorboard: bool = key(True, "event files in <run>/tb")
    wandb_mode: str = key("auto",
        "auto (online when logged in or WANDB_API_KEY is set, else offline), online, offline, disabled",
        choices=WANDB_MODES)
    wandb_project: str = key("", '"" = $WANDB_PROJECT or resnetdist')
    wandb_entity: str = key("", '"" = $WANDB_ENTITY or your default entity')
    wandb_group: str = key("", '"" = the net name, so seeds of one net group together (reproduce: the suite)')
    wandb_job_type: str = key("train",
        "the run's role in W&B (a suite's report run is \"report\"); the net and seed are in its config and tags")
    wandb_tags: list[str] = key([], "extra W&B tags")
    wandb_init_timeout_s: int = key(60, "online init gives up after this, and the run goes on offline", least=1)
    wandb_finish_timeout_s: int = key(300, "upload wait at the end; the rest stays on disk for wandb sync", least=1)


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
            getattr(self, section.name).validate()
        if self.optim.warmup_iters > self.optim.iters:
            raise ConfigError(f"optim.warmup_iters ({self.optim.warmup_iters}) exceeds optim.iters ({self.optim.iters})")


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


def merge(cfg: RunConfig, tree: dict[str, Any], source: str) -> None:
    """Apply a {section: {key: value}} tree onto cfg, checking names and types."""
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in tree.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {values!r}")
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key} (known: {', '.join(hints)})")
            setattr(getattr(cfg, section), key, _check_type(f"{source}: {section}.{key}", value, hints[key]))


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
    except tomllib.TOMLDecodeError as e:
        if any(c in raw for c in "\"'[]{}"):  # a string, list or table was meant: not a bare word
            raise ConfigError(f"--set {text!r}: {raw.strip()} is not valid TOML ({e})") from None
        value = raw.strip()
    return {section: {key: value}}


def load_config(config_file: Path | None = None, flags: dict[str, dict[str, Any]] | None = None,
                overrides: list[str] | None = None, iters: int | None = None) -> RunConfig:
    """Defaults < file < flags (--iters sets optim.iters) < --set, checked on the final values.
    The schedule moves with the run length only where it was written for another length
    (scale_schedule). "auto" values stay "auto": training/plan.resolve reads them on the machine
    that trains (a Slurm suite's runs on their own nodes)."""
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
    fill_recipe_defaults(cfg)
    cfg.validate()
    return cfg


def fill_recipe_defaults(cfg: RunConfig) -> None:
    """The values whose default depends on other keys, the same on every machine."""
    if cfg.optim.warmup_iters < 0:
        # The paper warms ResNet-110 up at lr 0.01 "until the training error is below 80% (about
        # 400 iterations)"; shallower nets need none. That point comes after as many iterations
        # in a short run as in a long one, so it is not scaled (a 200-iteration run would warm up
        # for 1); a run too short for it spends half its iterations warming up.
        cfg.optim.warmup_iters = min(PAPER_WARMUP_ITERS, cfg.optim.iters // 2) if cfg.model.n >= 18 else 0


# Values counted in iterations of a run: written for one run length (the defaults and the
# shipped configs for the paper's 64k), they move in proportion when the length changes.
SCHEDULE_KEYS = ("optim.milestones", "optim.warmup_iters", "train.eval_every", "train.checkpoint_every")


def schedule_lengths(sources: list[tuple[dict[str, Any], str]]) -> dict[str, int | None]:
    """For each schedule key, the optim.iters of the source that set it last (the defaults: 64k),
    or None when that source gave none (a --set, a file without optim.iters): kept as written."""
    lengths: dict[str, int | None] = {}
    for tree, _ in sources:
        for key in SCHEDULE_KEYS:
            section, name = key.split(".")
            if name in tree.get(section, {}):
                lengths[key] = tree.get("optim", {}).get("iters")
    return lengths


def scale_schedule(cfg: RunConfig, written_for: dict[str, int | None]) -> None:
    """Move each schedule value written for another run length to optim.iters, in proportion:
    milestones at or past the end are dropped, the warm-up keeps its length (at most half the
    run), and the evaluation and checkpoint cadence are whole multiples of log.log_every (so
    evaluations land on log points: a 2,000-iteration run of the defaults every 100)."""
    iters = cfg.optim.iters

    def moved(key: str, value: int) -> int | None:
        ref = written_for.get(key)
        return None if not ref or ref == iters or value <= 0 else max(1, round(value * iters / ref))

    o, t, every = cfg.optim, cfg.train, cfg.log.log_every
    if written_for.get("optim.milestones") not in (None, iters):
        o.milestones = [m for m in (moved("optim.milestones", m) for m in o.milestones) if m and m < iters]
    if written_for.get("optim.warmup_iters") not in (None, iters):  # a length in iterations: kept, capped (fill_recipe_defaults)
        o.warmup_iters = min(o.warmup_iters, iters // 2)
    for key in ("eval_every", "checkpoint_every"):
        value = moved(f"train.{key}", getattr(t, key))
        if value is not None and every >= 1:
            setattr(t, key, max(every, round(value / every) * every))


def from_dict(tree: dict[str, Any], source: str) -> RunConfig:
    cfg = RunConfig()
    merge(cfg, tree, source)
    fill_recipe_defaults(cfg)
    return cfg


def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(cfg.to_dict()) if tomli_w is not None else dumps_toml(cfg.to_dict())


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf / nan are spelt the same in TOML
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps_toml(tree: dict[str, dict[str, Any]]) -> str:
    """A {section: {key: scalar or list}} tree as TOML (no deeper nesting), without tomli-w."""
    out = []
    for section, values in tree.items():
        out += [f"[{section}]", *(f"{key} = {toml_value(v)}" for key, v in values.items()), ""]
    return "\n".join(out)


def diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """(section.key, value in a, value in b) for every key whose values differ."""
    da, db = a.to_dict(), b.to_dict()
    return [(f"{s}.{k}", da[s][k], db[s][k]) for s in da for k in da[s] if da[s][k] != db[s][k]]


# What a run directory's results depend on: resuming with any of these changed would splice
# two different experiments into one curve, so it is refused. Everything else (logging,
# devices, loader, speed settings, world size) may change between restarts.
RESUME_KEYS = ("model", "optim", "train.seed", "data.val_split", "data.mean", "data.channel_mean",
               "dist.batch_scaling")


def check_same_experiment(cfg: RunConfig, path: Path) -> None:
    """Refuse to continue a run directory whose config.toml (`path`) holds another experiment."""
    if not path.exists():
        return
    changed = [f"{key}: {was!r} -> {now!r}" for key, was, now in diff(from_dict(read_toml(path), str(path)), cfg)
               if key in RESUME_KEYS or key.split(".")[0] in RESUME_KEYS]
    if changed:
        raise ConfigError(f"{cfg.run_dir} holds a run with a different configuration ({'; '.join(changed)}); "
                          f"pass another --out, or delete that folder to start over")
