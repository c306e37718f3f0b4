"""resnetdist: He et al. 2015's CIFAR-10 ResNets and plain nets, trained with the paper's recipe.

The Python API (docs/api.md):

    import resnetdist
    net = resnetdist.resnet20()                       # or create_model("resnet56", shortcut="B")
    summary = resnetdist.train({"model": {"n": 3}})   # a run, in this process
    model = resnetdist.load("runs/resnet20-s0")       # the trained net, its mean image inside

Names are imported on first use (PEP 562), so `import resnetdist` and the command start
without loading torch.
"""

from __future__ import annotations

import importlib

__version__: str


def _version() -> str:
    """The installed distribution's version; in a checkout that is not installed, pyproject's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resnetdist")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


# where each public name lives; the model factories (resnet20 ... plain56) are models.MODELS's names
_WHERE = {"create_model": "models", "list_models": "models", "CifarResNet": "models",
          "load": "pretrained", "Classifier": "pretrained", "train": "api",
          "RunConfig": "config", "load_config": "config"}


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    else:
        models = importlib.import_module(".models", __name__)  # not `from . import`: that asks __getattr__
        if name not in models.MODELS:
            raise AttributeError(f"module 'resnetdist' has no attribute {name!r}")
        value = getattr(models, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), "__version__", *_WHERE, *importlib.import_module(".models", __name__).MODELS})
