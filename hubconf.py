"""torch.hub entry points: `torch.hub.load("<checkout or owner/repo>", "resnet56")` gives the
net the trainer builds (fresh weights; keyword arguments shortcut="A"|"B", num_classes), and
`torch.hub.load(..., "load", "runs/resnet56-s0")` a trained one (resnetdist.load: eval mode, the
run's mean image inside). `torch.hub.list(...)` names them."""

dependencies = ["torch", "numpy"]

from resnetdist.models import (  # noqa: E402,F401 - torch.hub reads `dependencies` first
    plain20, plain32, plain44, plain56, resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202,
)
from resnetdist.pretrained import load  # noqa: E402,F401
