"""`resnetdist export CHECKPOINT --format safetensors|onnx`: trained weights in a form that
others load without this package.

Both take a model.pt or a ckpt_*.pt and write beside the output `<stem>.mean.npy`, the float32
(3, 32, 32) mean image in [0, 1] units the net was trained with: input = uint8 image / 255 - mean.

- safetensors: the run's own model.safetensors format (pretrained.py, which `resnetdist.load`
  reads): the net's tensors under `net.`, the mean image as `mean`, and string metadata
  (`config` as JSON, `model`, `depth`, `plain`, `shortcut`, `num_classes`, `iteration`,
  `preprocess`, `mean_file`), written atomically with a sha256 sidecar.
- onnx: the eval-mode net, input `input` float32 (batch, 3, 32, 32) already mean-subtracted
  (normalisation is NOT in the graph), output `logits` (batch, 10), the same metadata in
  metadata_props. Before returning, onnxruntime runs it on two batch sizes and must match
  PyTorch within ONNX_TOLERANCE, else ExportError and the file is removed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint, pretrained
from ..models import CifarResNet

FORMATS = ("safetensors", "onnx")
ONNX_TOLERANCE = 1e-4
PREPROCESS = "x = uint8 RGB image (N,3,32,32); input = x / 255 - mean  (mean: float32 (3,32,32) in [0,1] units)"


class ExportError(RuntimeError):
    """Export failed or the exported file does not reproduce the PyTorch model."""


def export(path: Path, fmt: str, out: Path | None = None, data_dir: Path | None = None) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        model, cfg, state = pretrained.saved_net(Path(path))
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    model.eval()
    mean = pretrained.mean_of(state, cfg, path, data_dir)
    out = Path(out) if out else Path(path).with_suffix(f".{fmt}")  # run/model.pt -> run/model.onnx
    mfile = out.with_name(f"{out.stem}.mean.npy")
    meta = {**pretrained.metadata(cfg, int(state.get("iteration", cfg.optim.iters))), "mean_file": mfile.name}
    check_out(out)  # before converting: a bad path costs nothing and prints nothing else
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {}
        if fmt == "safetensors":
            checkpoint.atomic_save_bytes(pretrained.to_bytes(model, mean, meta), out)
        else:  # the graph takes mean-subtracted inputs: the .npy's formula
            result["max_abs_diff"] = export_onnx(model, {**meta, "preprocess": PREPROCESS}, out)
        np.save(mfile, mean.numpy().astype(np.float32))
        for written in (out, mfile):
            written.chmod(USUAL_MODE)  # safetensors writes 0600 (a private temporary file, renamed)
    except (OSError, checkpoint.WriteError) as e:  # a full disk, or the folder changed since the check
        e = getattr(e, "error", e)  # WriteError wraps the OSError
        raise ExportError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return {"format": fmt, "out": str(out), "mean": str(mfile), "model": cfg.model.name,
            "iteration": state.get("iteration"), **result}


def describe(result: dict[str, Any]) -> str:
    """`export`'s line for people, as `eval` has one: wrote runs/x/model.onnx (resnet20, iteration
    64,000; onnxruntime matches PyTorch within 2.4e-06) and its mean image runs/x/model.mean.npy"""
    facts = [result["model"]] + ([f"iteration {result['iteration']:,}"] if result.get("iteration") is not None else [])
    line = f"wrote {result['out']} ({', '.join(facts)}"
    if "max_abs_diff" in result:
        line += f"; onnxruntime matches PyTorch within {result['max_abs_diff']:.1e}"
    return f"{line}) and its mean image {result['mean']} (inputs: x / 255 - mean)"


def _usual_mode() -> int:
    """The mode open() gives a new file here (0666 less the umask), as for every other output."""
    os.umask(umask := os.umask(0o022))  # reading the umask sets it: put it back
    return 0o666 & ~umask


USUAL_MODE = _usual_mode()


def check_out(out: Path) -> None:
    """--out must be a writable file path: not a folder, not under a file, its folder writable
    (or creatable), the file itself writable if it exists."""
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder; give a file name inside it")
    if (blocker := checkpoint.not_a_folder(out.parent)) is not None:
        raise ExportError(f"--out {out}: {blocker} is a file, not a folder")
    existing = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    try:  # a real write (root passes access() checks; /proc and read-only mounts refuse anyway)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ExportError(f"--out {out}: {existing} is not writable ({e.strerror or e})") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise ExportError(f"--out {out}: the file exists and is not writable")


def export_onnx(model: CifarResNet, meta: dict[str, str], out: Path) -> float:
    """Export, attach metadata, then check with onnxruntime. Returns the max abs difference."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'resnetdist[export]'") from None
    log = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" etc.
    try:
        # torch.onnx prints its progress ("[torch.onnx] ... ✅") and warnings: kept for a failure
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
            torch.onnx.export(
                model, (torch.randn(4, 3, 32, 32),), str(out), input_names=["input"], output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False,
            )
    except Exception as e:
        # one line; its own output only when asked for (RESNETDIST_DEBUG, as for tracebacks)
        detail = f"\n{log.getvalue()}" if os.environ.get("RESNETDIST_DEBUG", "") not in ("", "0") else ""
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
                          f"{detail}") from e
    finally:
        onnx_logger.setLevel(level)
    proto = onnx.load(str(out))
    proto.doc_string = f"{meta['model']} (He et al. 2015, CIFAR-10), exported by resnetdist. {PREPROCESS}"
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    try:
        return check_onnx(model, out)
    except Exception:
        out.unlink(missing_ok=True)
        raise


def check_onnx(model: CifarResNet, out: Path) -> float:
    """Run the file in onnxruntime against PyTorch; raise ExportError past ONNX_TOLERANCE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for b in (1, 7):
        x = torch.randn(b, 3, 32, 32, generator=gen)
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(["logits"], {"input": x.numpy()})[0]
        if got.shape != want.shape:
            raise ExportError(f"{out}: onnxruntime gave shape {got.shape} for batch {b}, PyTorch {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(f"{out}: onnxruntime output differs from PyTorch by {worst:.3g} (> {ONNX_TOLERANCE}); "
                          f"export rejected")
    return worst

