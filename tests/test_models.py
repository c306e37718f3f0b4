import pytest
import torch

from resnetdist.models import BasicBlock, ModelConfig, ZeroPadShortcut, build_model, count_parameters

PAPER_PARAMS_M = {3: 0.27, 5: 0.46, 7: 0.66, 9: 0.85, 18: 1.7}


@pytest.mark.parametrize("n,millions", PAPER_PARAMS_M.items())
def test_parameter_counts_match_the_paper(n, millions):
    count = count_parameters(build_model(ModelConfig(n=n)))
    digits = 1 if millions >= 1 else 2
    assert round(count / 1e6, digits) == millions
    # the plain net has the same parameters: option A shortcuts have none
    assert count_parameters(build_model(ModelConfig(n=n, plain=True))) == count


def test_resnet20_exact_count():
    assert count_parameters(build_model(ModelConfig(n=3))) == 269_722


def test_depth_and_layout():
    model = build_model(ModelConfig(n=2))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 6 * 2 + 2  # conv layers plus the FC layer
    assert [c.out_channels for c in convs] == [16] * 5 + [32] * 4 + [64] * 4
    assert [c.stride[0] for c in convs if c.stride[0] == 2] == [2, 2]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == len(convs)


def test_option_a_shortcut_zero_pads_and_subsamples():
    x = torch.randn(2, 16, 32, 32)
    y = ZeroPadShortcut(16)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_option_b_uses_projections_only_where_shape_changes():
    model_a = build_model(ModelConfig(n=3, shortcut="A"))
    model_b = build_model(ModelConfig(n=3, shortcut="B"))
    # two projections: 16->32 and 32->64, each a 1x1 conv and a BN
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert count_parameters(model_b) - count_parameters(model_a) == extra
    x = torch.randn(4, 3, 32, 32)
    assert model_a(x).shape == model_b(x).shape == (4, 10)


def test_plain_blocks_have_no_shortcut():
    model = build_model(ModelConfig(n=2, plain=True))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert blocks and all(not b.residual for b in blocks)
    model.eval()
    x = torch.randn(1, 16, 8, 8)
    block = blocks[0]
    with torch.no_grad():
        expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
        assert torch.allclose(block(x), expected)


def test_invalid_model_config():
    with pytest.raises(ValueError, match="model.n"):
        build_model(ModelConfig(n=0))
    with pytest.raises(ValueError, match="model.shortcut"):
        build_model(ModelConfig(shortcut="C"))
