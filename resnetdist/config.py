"""One run's configuration: small dataclasses, each kept beside the code it configures, composed
here into RunConfig; loaded from TOML (configs/*.toml) plus `--set section.key=value` overrides.

Order of precedence: dataclass defaults < --config file < CLI flags < --set. Everything is
checked (unknown section or key, wrong type, impossible value) before any worker starts, and
the error names the key at fault. "auto" values are resolved once, here, so config.toml in the
run directory records what actually ran.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .checkpoint import atomic_write_text
from .data.loaders import DataConfig
from .dist import DistConfig
from .metrics import LogConfig
from .models import ModelConfig
from .train import OptimConfig, TrainConfig


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names it."""


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
    cfg = RunConfig()
    if config_file is not None:
        merge(cfg, read_toml(config_file), str(config_file))
    if flags:
        merge(cfg, flags, "command line")
    for text in overrides or []:
        merge(cfg, parse_override(text), f"--set {text}")
    resolve(cfg)
    if iters is not None:
        scale_schedule(cfg, iters)
    cfg.validate()
    return cfg


def resolve(cfg: RunConfig) -> None:
    """Fill in the values whose default depends on others."""
    if cfg.optim.warmup_iters < 0:
        # The paper warms ResNet-110 up at lr 0.01 for ~400 iterations; shallower nets need none.
        cfg.optim.warmup_iters = 400 if cfg.model.n >= 18 else 0


def scale_schedule(cfg: RunConfig, iters: int) -> None:
    """--iters N: shorten (or lengthen) the run, moving the lr milestones in proportion."""
    if iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    old = cfg.optim.iters
    cfg.optim.milestones = [max(1, round(m * iters / old)) for m in cfg.optim.milestones]
    cfg.optim.warmup_iters = min(cfg.optim.warmup_iters, iters)
    cfg.optim.iters = iters


def from_dict(tree: dict[str, Any], source: str) -> RunConfig:
    cfg = RunConfig()
    merge(cfg, tree, source)
    return cfg


def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(cfg.to_dict())


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


def write_run_config(cfg: RunConfig) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run_dir / "config.toml", to_toml(cfg))
