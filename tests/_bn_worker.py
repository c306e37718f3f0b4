"""Worker for tests/test_gpu_path.py, run under torchrun (gloo, CPU): every rank gives its
model's BatchNorm buffers rank-dependent values, evaluates with error_rates, and prints (JSON)
whether its buffers now equal rank 0's and the error it got.

usage: torchrun --standalone --nproc_per_node=2 tests/_bn_worker.py DATA_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from resnetdist.config import ModelConfig
from resnetdist.data import cifar
from resnetdist.data.resident import ResidentEvalLoader
from resnetdist.training.evaluate import error_rates
from resnetdist.models import build_model

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = build_model(ModelConfig(n=1))
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 1 + rank, generator=torch.Generator().manual_seed(rank))
        m.running_var.fill_(1.0 + rank)
        m.num_batches_tracked.fill_(10 + rank)
data = cifar.load_cifar10(Path(sys.argv[1]))
loader = ResidentEvalLoader(data.test, 50, rank, dist.get_world_size(), torch.device("cpu"))
errors = error_rates(model, {"test": loader}, torch.zeros(3, 32, 32))
same = True
for buf in model.buffers():
    ref = buf.clone()
    dist.broadcast(ref, src=0)
    same &= torch.equal(ref, buf)
print(json.dumps({"rank": rank, "same_as_rank0": bool(same), "test_error": errors["test_error"]}), flush=True)
dist.destroy_process_group()
