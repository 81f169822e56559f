"""senet/: the SE block, the backbones, and the paper's complexity columns."""

from __future__ import annotations

import pytest
import torch
import torchvision

from senet import ARCHS, SqueezeExcitation, build_model, complexity, se_blocks
from senet.complexity import count_macs


def meta_model(**cfg):
    with torch.device("meta"):
        return build_model(cfg)


def se50(**se):
    return meta_model(arch="resnet50", se=se)


# Trainable parameters of SE-ResNet-50 (FC with bias), from the reference file's arithmetic.
TRAINABLE = {
    "r=2": (dict(reduction=2), 45_699_240),
    "r=4": (dict(reduction=4), 35_635_688),
    "r=8": (dict(reduction=8), 30_603_912),
    "r=16": (dict(reduction=16), 28_088_024),
    "r=32": (dict(reduction=32), 26_830_080),
    "SE_Stage_2": (dict(stages=[2]), 25_582_424),
    "SE_Stage_3": (dict(stages=[3]), 25_690_280),
    "SE_Stage_4": (dict(stages=[4]), 26_349_992),
    "SE_Stage_5": (dict(stages=[5]), 27_136_424),
    "SE_3x3": (dict(position="3x3"), 25_718_228),
}


@pytest.mark.parametrize("name", TRAINABLE)
def test_trainable_params_match_reference(name):
    se, expected = TRAINABLE[name]
    assert complexity(se50(**se)).params == expected


def test_plain_resnet50_params():
    assert complexity(meta_model(arch="resnet50")).params == 25_557_032


# The paper's Params column (M, rounded to 0.1M): Tables 10, 13, 15, 16.
PAPER_PARAMS = [
    (None, 25.6),
    (dict(reduction=4), 35.7),
    (dict(reduction=8), 30.7),
    (dict(reduction=16), 28.1),
    (dict(reduction=32), 26.9),
    (dict(stages=[2]), 25.6),
    (dict(stages=[3]), 25.7),
    (dict(stages=[4]), 26.4),
    (dict(position="3x3"), 25.8),
    (dict(squeeze="none"), 28.1),
]


@pytest.mark.parametrize("se,paper", PAPER_PARAMS, ids=[str(s) for s, _ in PAPER_PARAMS])
def test_caffe_params_round_to_paper(se, paper):
    c = complexity(meta_model(arch="resnet50", se=se))
    assert round(c.caffe_params / 1e6, 1) == paper


def test_caffe_rule_misses_r2_by_half_a_digit():
    # The one row the Caffe-style rule does not reproduce: the paper prints 45.7M for r = 2,
    # which is the trainable count (45.70M); the Caffe-style count is 45.75M and rounds up.
    c = complexity(se50(reduction=2))
    assert round(c.params / 1e6, 1) == 45.7
    assert round(c.caffe_params / 1e6, 2) == 45.75


def test_caffe_params_add_batchnorm_blobs():
    c = complexity(meta_model(arch="resnet50"))
    # 53,120 running mean/var values and one scalar for each of ResNet-50's 53 BN layers.
    assert c.caffe_params - c.params == 53_120 + 53


PAPER_GFLOPS = [
    (None, 3.86),
    (dict(stages=[2]), 3.86),
    (dict(stages=[3]), 3.86),
    (dict(stages=[4]), 3.86),
    (dict(stages=[5]), 3.86),
    (dict(position="3x3"), 3.86),
    (dict(), 3.87),
    (dict(squeeze="none"), 4.27),
]


@pytest.mark.parametrize("se,paper", PAPER_GFLOPS, ids=[str(s) for s, _ in PAPER_GFLOPS])
def test_multiply_adds_round_to_paper(se, paper):
    assert round(complexity(meta_model(arch="resnet50", se=se)).gflops, 2) == paper


def test_se_pooling_and_rescale_are_counted():
    plain, se = (complexity(meta_model(arch="resnet50", se=s)).macs for s in (None, {}))
    fc_only = 2_514_944  # the SE FC layers; pooling and rescale add 5,519,360 each
    assert se - plain == fc_only + 2 * 5_519_360


@pytest.mark.parametrize("ours,theirs", [("resnet50", "resnet50"), ("resnext50_32x4d", "resnext50_32x4d")])
def test_matches_torchvision(ours, theirs):
    # torchvision's ResNet-50 is "v1.5" (stride in the 3x3); its ResNeXt puts the stride there too.
    tv = getattr(torchvision.models, theirs)()
    stride_in = "3x3" if ours == "resnet50" else None
    c = complexity(meta_model(arch=ours, stride_in=stride_in))
    assert c.params == sum(p.numel() for p in tv.parameters())
    assert c.macs == count_macs(tv, 224)


def test_original_resnet50_is_cheaper_than_v15():
    v1, v15 = (complexity(meta_model(arch="resnet50", stride_in=s)).macs for s in ("1x1", "3x3"))
    assert round(v1 / 1e9, 3) == 3.858 and round(v15 / 1e9, 3) == 4.089


def test_classic_cifar_resnets_match_he_et_al():
    # He et al. 2016, Table 6 (option-A shortcuts): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M params.
    expected = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7}
    for arch, millions in expected.items():
        n = complexity(meta_model(arch=arch, num_classes=10), 32).params / 1e6
        assert round(n, 2 if millions < 1 else 1) == millions, (arch, n)
    # He et al. 2016b: pre-activation ResNet-164 has 1.7M parameters.
    assert round(complexity(meta_model(arch="resnet164", num_classes=10), 32).params / 1e6, 1) == 1.7


@pytest.mark.parametrize("arch", list(ARCHS))
def test_output_shapes_every_arch(arch):
    size = 64 if ARCHS[arch].stem == "imagenet" else 32
    with_se = dict(reduction=4) if ARCHS[arch].widths[0] >= 64 else dict(reduction=4, stages=[3, 4])
    # The deepest ImageNet nets only need their shapes checked: the meta device skips the arithmetic.
    device = "meta" if arch in ("resnet101", "resnet152") else "cpu"
    with torch.device(device):
        model = build_model(dict(arch=arch, num_classes=7, se=with_se)).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    if device == "cpu":
        assert torch.isfinite(out).all()


def _pair(**se_a_b):
    """Two models with identical weights that differ only in one SE option."""
    (key, (a, b)), = se_a_b.items()
    torch.manual_seed(0)
    m_a = build_model(dict(arch="resnet20", num_classes=10, se={key: a, "reduction": 4}))
    m_b = build_model(dict(arch="resnet20", num_classes=10, se={key: b, "reduction": 4}))
    m_b.load_state_dict(m_a.state_dict())
    return m_a.eval(), m_b.eval()


def test_max_and_avg_squeeze_differ_for_same_weights():
    m_avg, m_max = _pair(squeeze=("avg", "max"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(m_avg(x), m_max(x), atol=1e-5)


@pytest.mark.parametrize("gates", [("sigmoid", "tanh"), ("sigmoid", "relu"), ("sigmoid", "hardsigmoid"), ("tanh", "relu")])
def test_excitation_gates_differ(gates):
    m_a, m_b = _pair(excitation=gates)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(m_a(x), m_b(x), atol=1e-5)


def test_each_integration_differs_from_the_others():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    outputs = {}
    for integration in ("standard", "pre", "post", "identity"):
        torch.manual_seed(1)  # SE weights differ in shape between variants; keep the rest equal
        model = build_model(dict(arch="resnet18_cifar", num_classes=10, se=dict(integration=integration, reduction=8)))
        with torch.no_grad():
            outputs[integration] = model.eval()(x)
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)


def test_integration_wiring_on_one_unit():
    """Check each strategy against a hand-written forward of the same unit (Table 14)."""
    import torch.nn.functional as F

    x = torch.randn(2, 64, 8, 8)
    for integration in ("standard", "pre", "post", "identity"):
        torch.manual_seed(0)
        model = build_model(dict(arch="resnet18_cifar", num_classes=10, se=dict(integration=integration)))
        unit = model.stage2.block1.eval()
        with torch.no_grad():
            if integration == "standard":
                ref = F.relu(unit.se(unit.branch(x)) + x)
            elif integration == "pre":
                ref = F.relu(unit.branch(unit.se(x)) + x)
            elif integration == "post":
                ref = unit.se(F.relu(unit.branch(x) + x))
            else:
                ref = F.relu(unit.branch(x) + unit.se(x))
            assert torch.allclose(unit(x), ref, atol=1e-6), integration


def test_gradients_reach_se_parameters():
    for se in (dict(), dict(squeeze="none"), dict(position="3x3"), dict(integration="identity")):
        model = build_model(dict(arch="resnet50_cifar", num_classes=10, se=dict(se, reduction=16)))
        model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
        blocks = se_blocks(model)
        assert len(blocks) == 16
        for name, block in blocks.items():
            for p in block.parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, (se, name)


def test_se_block_math():
    block = SqueezeExcitation(8, reduction=2).eval()
    x = torch.randn(3, 8, 5, 5)
    z = x.mean((2, 3))
    w1, b1 = block.reduce.weight.flatten(1), block.reduce.bias
    w2, b2 = block.expand.weight.flatten(1), block.expand.bias
    s = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    with torch.no_grad():
        assert torch.allclose(block(x), x * s[:, :, None, None], atol=1e-6)
    assert block.hidden == 4


def test_hidden_width_is_exact_floor():
    assert SqueezeExcitation(100, reduction=16).hidden == 6  # no rounding to a multiple of 8


def test_no_squeeze_works_per_position():
    block = SqueezeExcitation(8, reduction=2, squeeze="none").eval()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        out = block(x)
        # each position is recalibrated from its own channel vector only
        single = block(x[:, :, 1:2, 2:3])
    assert torch.allclose(out[:, :, 1:2, 2:3], single, atol=1e-6)


def test_bias_switch():
    with_bias = SqueezeExcitation(64, bias=True)
    without = SqueezeExcitation(64, bias=False)
    assert with_bias.reduce.bias is not None and without.reduce.bias is None
    assert sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in without.parameters()) == 4 + 64


def test_reduction_too_large_names_stage_and_channels():
    with pytest.raises(ValueError, match=r"model\.se\.reduction: r=32 is too large for stage 2 of resnet20: 16 channels // 32"):
        build_model(dict(arch="resnet20", se=dict(reduction=32)))
    # leaving the narrow stage out makes it valid
    build_model(dict(arch="resnet20", se=dict(reduction=32, stages=[4])))


@pytest.mark.parametrize(
    "cfg,pattern",
    [
        (dict(arch="resnet51"), r"model\.arch: 'resnet51': .*resnet50"),
        (dict(arch="resnet50", se=dict(squeeze="mean")), r"model\.se\.squeeze: 'mean': .*'avg', 'max' or 'none'"),
        (dict(arch="resnet50", se=dict(excitation="softmax")), r"model\.se\.excitation: .*'sigmoid'"),
        (dict(arch="resnet50", se=dict(integration="middle")), r"model\.se\.integration: .*'standard'"),
        (dict(arch="resnet50", se=dict(position="1x1")), r"model\.se\.position: .*'output' or '3x3'"),
        (dict(arch="resnet50", se=dict(reduction=0)), r"model\.se\.reduction: 0: "),
        (dict(arch="resnet50", se=dict(stages=[])), r"model\.se\.stages: .*at least one stage"),
        (dict(arch="resnet50", se=dict(stages=[6])), r"model\.se\.stages: stage 6 does not exist in resnet50 \(stages 2, 3, 4, 5\)"),
        (dict(arch="resnet56", se=dict(position="3x3")), r"model\.se\.position: '3x3' needs bottleneck blocks"),
        (dict(arch="resnet50", se=dict(position="3x3", integration="post")), r"model\.se\.position: .*standard"),
        (dict(arch="resnet50", se=dict(ratio=4)), r"model\.se\.ratio: unknown key"),
        (dict(arch="resnet50", stride_in="5x5"), r"model\.stride_in: "),
    ],
)
def test_bad_values_raise_value_error_naming_the_key(cfg, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_model(cfg)


def test_module_names_for_hooks():
    model = meta_model(arch="resnet50", se={})
    names = list(se_blocks(model))
    assert names[0] == "stage2.block1.se" and names[-1] == "stage5.block3.se"
    assert "stage3.block4.se" in names  # the paper's SE_3_4: the last SE block of stage 3
    # hooking the gate yields the excitation vector s
    model = build_model(dict(arch="resnet20", num_classes=10, se=dict(reduction=4))).eval()
    seen = {}
    gate = model.get_submodule("stage3.block3.se.gate")
    gate.register_forward_hook(lambda m, i, o: seen.setdefault("s", o))
    with torch.no_grad():
        model(torch.randn(5, 3, 32, 32))
    assert seen["s"].shape == (5, 32, 1, 1)
    assert ((seen["s"] > 0) & (seen["s"] < 1)).all()


def test_plain_backbone_has_no_se():
    assert se_blocks(meta_model(arch="resnet50")) == {}
    assert se_blocks(meta_model(arch="resnet50", se=None)) == {}
