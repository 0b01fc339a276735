"""Small CNNs from scratch: exact parameter counts, budgets, weights, and that every preset trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from classforge.core.errors import ClassforgeError
from classforge.models.registry import Classifier, count_params, create_backbone, registered
from classforge.models.small_cnn import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    PRESETS,
    TTA_MODES,
    TTA_VIEWS,
    PatchWhiten,
    total_params,
)

PRESET_NAMES = ["cnn", *PRESETS, "capsnet"]


def params_with_head(name: str, num_classes: int = 10, **kw) -> int:
    return count_params(Classifier(create_backbone(name, pretrained=False, **kw), num_classes))["total"]


def test_all_registered_as_image_backbones():
    reg = registered()
    for name in PRESET_NAMES:
        assert reg[name].task == "image"


def test_lenet_is_the_tutorial_network():
    b = create_backbone("cnn_lenet", pretrained=False)
    assert b.feature_dim == 84
    # conv1 3*6*5*5+6 = 456; conv2 6*16*5*5+16 = 2,416; fc1 16*5*5*120+120 = 48,120; fc2 120*84+84 = 10,164;
    # head 84*10+10 = 850
    assert params_with_head("cnn_lenet") == 456 + 2_416 + 48_120 + 10_164 + 850 == 62_006
    convs = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(6, (5, 5), (0, 0)), (16, (5, 5), (0, 0))]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in b.modules())
    assert [m.out_features for m in b.modules() if isinstance(m, nn.Linear)] == [120, 84]


def test_preset_sizes_for_10_classes():
    assert params_with_head("cnn_small") < 100_000
    assert 260_000 < params_with_head("cnn_resnet20") < 280_000  # ResNet-20: 0.27M
    assert params_with_head("cnn_resnet_256k") <= 256_000
    resnet20 = create_backbone("cnn_resnet20", pretrained=False)
    assert sum(isinstance(m, nn.Conv2d) for m in resnet20.modules()) == 19  # + the head = 20 layers


def test_input_spec():
    spec = create_backbone("cnn_resnet20", pretrained=False).spec
    assert (spec.task, spec.size, spec.mean, spec.std) == ("image", 32, CIFAR10_MEAN, CIFAR10_STD)
    assert (spec.interpolation, spec.crop_pct, spec.channels) == ("bilinear", 1.0, 3)
    mono = create_backbone("cnn_small", pretrained=False, in_channels=1, input_size=64)
    assert (mono.spec.channels, mono.spec.size, len(mono.spec.mean)) == (1, 64, 1)
    assert mono(torch.randn(2, 1, 64, 64)).shape == (2, 128)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_forward_backward(name):
    torch.manual_seed(0)
    model = Classifier(create_backbone(name, pretrained=False), 10)
    x = torch.randn(2, 3, 32, 32)
    assert model.backbone(x).shape == (2, model.backbone.feature_dim)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    # every weight learns, except the patch-whitening stem (filters fitted from data, frozen by design; its bias
    # frozen too by default, so that backpropagation stops at the first trained conv)
    frozen = {id(p) for m in model.modules() if isinstance(m, PatchWhiten) for p in (m.weight, m.bias)}
    assert all((p.grad is None) == (id(p) in frozen) for p in model.parameters())
    # param_groups: every parameter exactly once, from input to output
    groups = model.backbone.param_groups()
    flat = [id(p) for g in groups for p in g]
    assert sorted(flat) == sorted(id(p) for p in model.backbone.parameters())
    first_param = next(model.backbone.parameters())
    assert groups[0][0] is first_param


@pytest.mark.parametrize("name", ["cnn_lenet", "cnn_resnet20"])
def test_channels_last_gives_the_same_features(name):
    b = create_backbone(name, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = b(x)
        out = b.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_max_params_refuses_with_the_count_and_a_hint():
    with pytest.raises(ClassforgeError) as e:
        create_backbone("cnn_resnet20", pretrained=False, max_params=256_000, num_classes=10)
    msg = str(e.value)
    assert "269,722" in msg and "256,000" in msg and "--fit-budget" in msg
    # the head counts: LeNet fits 62,006 exactly with 10 classes, not with 11
    create_backbone("cnn_lenet", pretrained=False, max_params=62_006, num_classes=10)
    with pytest.raises(ClassforgeError, match="62,091"):
        create_backbone("cnn_lenet", pretrained=False, max_params=62_006, num_classes=11)


@pytest.mark.parametrize("name,budget", [("cnn_resnet20", 256_000), ("cnn_small", 50_000), ("cnn_lenet", 150_000)])
def test_fit_budget_gives_the_largest_net_that_fits(name, budget):
    b = create_backbone(name, pretrained=False, fit_budget=budget, num_classes=10)
    n = total_params(b, 10)
    assert n == params_with_head(name, widths=b.config["widths"], hidden=b.config["hidden"])
    assert 0.97 * budget <= n <= budget
    # one more channel in the last stage no longer fits
    wider = list(b.config["widths"])
    wider[-1] += 1
    assert params_with_head(name, widths=wider, hidden=b.config["hidden"]) > budget


def test_fit_budget_too_small_and_bad_arguments():
    with pytest.raises(ClassforgeError, match="too small"):
        create_backbone("cnn_resnet20", pretrained=False, fit_budget=100, num_classes=10)
    with pytest.raises(ClassforgeError, match="Did you mean 'widths'"):
        create_backbone("cnn", pretrained=False, width=[8, 16])
    with pytest.raises(ClassforgeError, match="plain"):
        create_backbone("cnn", pretrained=False, block="dense")
    with pytest.raises(ClassforgeError, match="too small"):
        create_backbone("cnn_lenet", pretrained=False, input_size=8)


def test_cnn_family_arguments():
    b = create_backbone("cnn", pretrained=False, widths="8,16", depth=2, block="residual", dropout=0.1)
    assert b.feature_dim == 16
    assert sum(isinstance(m, nn.Conv2d) for m in b.modules()) == 1 + 2 * 2 * 2
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    narrowing = create_backbone("cnn", pretrained=False, widths=[16, 8], block="residual")  # 1x1 projection
    assert narrowing(torch.randn(1, 3, 32, 32)).shape == (1, 8)


def test_weights_file_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("cnn_resnet20", pretrained=False).eval()
    for m in src.modules():  # make the zero-initialised BNs non-trivial so the check means something
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "bb.safetensors"))
    save_file({f"backbone.{k}": v.contiguous() for k, v in src.state_dict().items()}
              | {"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)},
              str(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for f in ("bb.safetensors", "model.safetensors"):
        b = create_backbone("cnn_resnet20", pretrained=False, weights=str(tmp_path / f)).eval()
        assert b.weights_source.startswith("file:")
        torch.testing.assert_close(b(x), src(x))
    with pytest.raises(ClassforgeError, match="does not match"):
        create_backbone("cnn_small", pretrained=False, weights=str(tmp_path / "bb.safetensors"))


def test_capsnet_trains_on_tiny_random_data():
    torch.manual_seed(0)
    b = create_backbone("capsnet", pretrained=False, input_size=28, conv_channels=16, primary_types=4,
                        capsule_dim=8, num_classes=2)
    assert b.feature_dim == 2 * 8  # one 8-D digit capsule per class, flattened
    model = Classifier(b, 2)
    x = torch.randn(16, 3, 28, 28)
    y = torch.arange(16) % 2
    x[y == 1, 0] += 1.0  # a learnable difference between the classes
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    lengths = b.capsule_lengths(x)
    assert lengths.shape == (16, 2) and bool(((lengths >= 0) & (lengths < 1)).all())  # squashed


def test_capsnet_budget_check():
    with pytest.raises(ClassforgeError, match="capsnet has"):
        create_backbone("capsnet", pretrained=False, max_params=500_000, num_classes=10)
    with pytest.raises(ClassforgeError, match="fit_budget"):
        create_backbone("capsnet", pretrained=False, fit_budget=500_000)


def test_patch_whitening_decorrelates_patches():
    """After fit, the stem's outputs over 2x2 patches of correlated images have identity covariance (up to eps),
    and the second half of the filters is the negated first half."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1, 16, 16, generator=g)
    x = torch.cat([base, 0.8 * base + 0.2 * torch.randn(64, 1, 16, 16, generator=g),
                   torch.nn.functional.avg_pool2d(base, 3, 1, 1)], 1) * 2 + 1  # strongly correlated channels
    w = PatchWhiten(3, 2, eps=1e-6)
    w.fit(x)
    with torch.no_grad():
        y = w(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(y.T)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=2e-2, rtol=0)
    torch.testing.assert_close(w.weight[12:], -w.weight[:12])
    loss = w(x).square().mean()
    loss.backward()
    assert w.weight.grad is None and w.bias.grad is not None  # filters frozen, bias learns


def test_pooled_block_shapes_and_options():
    b = create_backbone("cnn", pretrained=False, widths=[8, 16], depth=[1, 3], block="pooled", global_pool="max")
    convs = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in b.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 4 and len(pools) == 2 and isinstance(b.pool, nn.AdaptiveMaxPool2d)
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    s = create_backbone("cnn_fast_256k", pretrained=False, num_classes=10)
    assert isinstance(s.whiten, PatchWhiten) and total_params(s, 10) <= 256_000
    x = torch.randn(3, 3, 32, 32)
    ref = s.eval()(x)
    assert s.init_from_data(torch.randn(50, 3, 32, 32)) and not torch.allclose(s(x), ref)
    with pytest.raises(ClassforgeError, match="stem"):
        create_backbone("cnn", pretrained=False, block="residual", stem="whiten")
    with pytest.raises(ClassforgeError, match="block must be one of"):
        create_backbone("cnn", pretrained=False, block="dense")


def test_flat_stage_keeps_the_size():
    """block=flat: convs without a pool, so the next stage runs at the same size ("plain,flat,plain": the last
    stage's convs see 15x15 maps instead of 7x7) with the same parameters as the all-plain net."""
    kw = dict(widths=[8, 16, 24], depth=2, stem="whiten", global_pool="max")
    sizes: dict[str, list[int]] = {}
    for block in ("plain", "plain,flat,plain"):
        b = create_backbone("cnn", pretrained=False, block=block, **kw)
        seen = []
        for m in b.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(out.shape[-1]))
        assert b(torch.randn(2, 3, 32, 32)).shape == (2, 24)
        sizes[block] = seen
        assert sum(isinstance(m, nn.MaxPool2d) for m in b.modules()) == {"plain": 3, "plain,flat,plain": 2}[block]
    assert sizes["plain"] == [31, 31, 15, 15, 7, 7]
    assert sizes["plain,flat,plain"] == [31, 31, 15, 15, 15, 15]
    assert total_params(create_backbone("cnn", pretrained=False, block="plain,flat,plain", **kw), 10) == \
        total_params(create_backbone("cnn", pretrained=False, block="plain", **kw), 10)


def test_plain_256k_is_the_fast_net_in_vgg_order():
    """Same layers and parameter count as cnn_fast_256k, but every conv of a stage runs before the stage's pool:
    the convs see 31/31, 15/15, 7/7 px maps instead of 31/15, 15/7, 7/3, so about twice the multiply-adds."""
    from classforge.models.anatomy import describe

    fast = create_backbone("cnn_fast_256k", pretrained=False, num_classes=10)
    plain = create_backbone("cnn_plain_256k", pretrained=False, num_classes=10)
    assert total_params(plain, 10) == total_params(fast, 10) <= 256_000
    assert isinstance(plain.whiten, PatchWhiten) and isinstance(plain.pool, nn.AdaptiveMaxPool2d)

    def conv_sides(b):
        sides = []
        hooks = [m.register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
                 for m in b.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, PatchWhiten)]
        b.eval()(torch.randn(1, 3, 32, 32))
        for h in hooks:
            h.remove()
        return sides

    assert conv_sides(fast) == [31, 15, 15, 7, 7, 3]  # the pooled block: conv, pool, conv at the pooled size
    assert conv_sides(plain) == [31, 31, 15, 15, 7, 7]
    macs = {n: describe(Classifier(b, 10), (3, 32, 32)).totals["macs"] for n, b in (("fast", fast), ("plain", plain))}
    assert 1.8 < macs["plain"] / macs["fast"] < 2.1


def test_one_block_type_per_stage():
    """block="pooled,pooled,plain": the first two stages pool after their first conv, the last pools after both,
    so its second conv (the largest layer) runs on 7x7 maps instead of 3x3; same weights as cnn_fast_256k, and
    the same state_dict keys as a net of one block type would have for those stages."""
    fast = create_backbone("cnn_fast_256k", pretrained=False, num_classes=10)
    hybrid = create_backbone("cnn_fast_256k", pretrained=False, num_classes=10, block="pooled,pooled,plain")
    assert total_params(hybrid, 10) == total_params(fast, 10)
    sides = []
    for m in hybrid.modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, PatchWhiten):
            m.register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
    assert hybrid.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 112)
    assert sides == [31, 15, 15, 7, 7, 7]
    plain = create_backbone("cnn_plain_256k", pretrained=False, num_classes=10)
    hybrid.stages[3].load_state_dict(plain.stages[3].state_dict())  # a plain stage is a plain stage
    assert hybrid.config["block"] == "pooled,pooled,plain"
    with pytest.raises(ClassforgeError, match="3 stages"):
        create_backbone("cnn_fast_256k", pretrained=False, block="pooled,plain")
    with pytest.raises(ClassforgeError, match="cannot be mixed"):
        create_backbone("cnn", pretrained=False, block="residual,plain,plain")
    with pytest.raises(ClassforgeError, match="block must be one of"):
        create_backbone("cnn", pretrained=False, block="pooled,dense,plain")


def test_plainpool_pools_before_the_last_bn_and_computes_what_plain_computes():
    """block=plainpool: the stage's max-pool moves from after its last ReLU to straight after its last conv. Same
    parameters, same convs at the same sizes; with the same weights and BN statistics and positive BN scales the
    eval-mode output is exactly plain's (max-pool commutes with a monotone BN and with ReLU), while a negative
    scale breaks the equality (the test can tell the orders apart). The last BN and ReLU of each stage run on a
    quarter of the values, so the anatomy counts fewer element-wise operations and the same MACs."""
    from classforge.models.anatomy import describe

    plain = create_backbone("cnn_plain_256k", pretrained=False, num_classes=10)
    pp = create_backbone("cnn_plain_256k", pretrained=False, num_classes=10, block="plainpool")
    assert pp.config["block"] == "plainpool"
    assert total_params(pp, 10) == total_params(plain, 10)
    assert [type(m).__name__ for m in pp.stages[1]] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d",
                                                          "BatchNorm2d", "ReLU"]
    g = torch.Generator().manual_seed(0)
    sd = plain.state_dict()
    for k, v in sd.items():  # non-trivial BN statistics and positive scales
        if k.endswith("running_mean") or k.endswith(".bias"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)
        elif k.endswith("running_var") or (k.endswith(".weight") and v.dim() == 1):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    plain.load_state_dict(sd)
    pk = pp.state_dict()
    assert [tuple(v.shape) for v in pk.values()] == [tuple(v.shape) for v in sd.values()]
    pp.load_state_dict(dict(zip(pk, sd.values())))
    x = torch.randn(4, 3, 32, 32, generator=g)
    plain.eval(), pp.eval()
    with torch.no_grad():
        torch.testing.assert_close(pp(x), plain(x), rtol=1e-5, atol=1e-5)
        pp.stages[2][5].weight.mul_(-1)  # a negative BN scale turns the max into a min: the orders now differ
        assert not torch.allclose(pp(x), plain(x), atol=1e-3)
    a_plain = describe(Classifier(plain, 10), (3, 32, 32)).totals
    a_pp = describe(Classifier(pp, 10), (3, 32, 32)).totals
    assert a_pp["macs"] == a_plain["macs"]
    assert a_pp["ops"] < a_plain["ops"]
    pp.train()
    out = pp(torch.randn(8, 3, 32, 32, generator=g))
    out.sum().backward()
    assert all(p.grad is not None for n, p in pp.named_parameters() if "stages.0" not in n)


def test_squeeze_excite_and_gelu_options_fit_the_budget_gate_each_image_and_are_counted():
    """se=8 ends every stage with a squeeze-and-excitation gate (2*C*C/8 + C/8 + C parameters per stage: 4,650 on
    cnn_plain_256k, still under 256K with the head): each image's channels are scaled by weights in (0, 1) computed
    from that image's channel means, and the loss reaches both of its convs. act=gelu replaces every ReLU. The anatomy lists
    the gate's multiplications and the GELUs; bad values are refused with the allowed ones."""
    from classforge.models.anatomy import describe
    from classforge.models.small_cnn import SqueezeExcite

    base = create_backbone("cnn_plain_256k", pretrained=False, num_classes=10, block="plainpool")
    net = create_backbone("cnn_plain_256k", pretrained=False, num_classes=10, max_params=256_000, block="plainpool",
                          act="gelu", se=8)
    assert net.config["act"] == "gelu" and net.config["se"] == 8
    assert total_params(net, 10) - total_params(base, 10) == sum(2 * c * (c // 8) + c // 8 + c for c in (32, 64, 112))
    assert total_params(net, 10) == 255_756
    ses = [m for m in net.modules() if isinstance(m, SqueezeExcite)]
    assert len(ses) == 3 and not any(isinstance(m, nn.ReLU) for s in net.stages for m in s)
    assert sum(isinstance(m, nn.GELU) for m in net.modules()) == 1 + 2 * 3  # stem + two convs per stage
    x = torch.randn(4, 32, 7, 7)
    se0 = ses[0].eval()
    with torch.no_grad():
        w = torch.sigmoid(se0.expand(torch.relu(se0.reduce(x.mean((2, 3), keepdim=True)))))  # (4, 32, 1, 1)
        torch.testing.assert_close(se0(x), x * w)  # each image's channels scaled by its own weights in (0, 1)
    assert w.std(0).max() > 1e-3 and 0 < w.min() and w.max() < 1
    rows = describe(Classifier(net, 10), (3, 32, 32)).rows
    gates = [r for r in rows if r.fn.startswith("Gate")]
    assert [r.mults for r in gates] == [32 * 15 * 15, 64 * 7 * 7, 112 * 3 * 3]  # one multiplication per gated value
    assert sum(r.fn.startswith("GELU") for r in rows) == 7
    net.train()
    loss = torch.nn.functional.cross_entropy(Classifier(net, 10)(torch.randn(8, 3, 32, 32)), torch.arange(8))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for s in ses for p in s.parameters())
    with pytest.raises(ClassforgeError, match="act must be one of relu, gelu, silu"):
        create_backbone("cnn_plain_256k", pretrained=False, act="tanh")
    with pytest.raises(ClassforgeError, match="se is the squeeze-and-excitation reduction"):
        create_backbone("cnn_plain_256k", pretrained=False, se=-1)
    with pytest.raises(ClassforgeError, match="se is the squeeze-and-excitation reduction"):
        create_backbone("cnn_plain_256k", pretrained=False, se="big")
    with pytest.raises(ClassforgeError, match="not residual"):
        create_backbone("cnn_resnet20", pretrained=False, se=8)
    from classforge.models.small_cnn import ResUnit

    res = create_backbone("cnn", pretrained=False, widths=[8, 16], depth=2, block="plainres", act="silu", se=4)
    units = [m for m in res.modules() if isinstance(m, ResUnit)]
    assert len(units) == 2 and all(isinstance(u.act, nn.SiLU) for u in units)  # the residual units use act too
    assert not any(isinstance(m, nn.ReLU) for s in res.stages for m in s)


def test_plainres_stage_is_plain_with_identity_residual_units():
    """block=plainres: the same convs, parameters and map sizes as plain, but convs 2..depth of a stage are
    ReLU(x + BN(Conv(x))) units whose BN scale starts at zero, so at init each unit passes its input through
    unchanged; the anatomy counts one residual addition per output value of each unit."""
    from classforge.models.anatomy import describe
    from classforge.models.small_cnn import ResUnit

    kw = dict(widths=[8, 16, 24], depth=[3, 2, 1], stem="whiten", global_pool="max")
    plain = create_backbone("cnn", pretrained=False, block="plain", **kw)
    res = create_backbone("cnn", pretrained=False, block="plainres", **kw)
    assert total_params(res, 10) == total_params(plain, 10)
    units = [m for m in res.modules() if isinstance(m, ResUnit)]
    assert len(units) == 2 + 1 + 0  # depth - 1 per stage
    x = torch.rand(4, 8, 9, 9)
    assert torch.equal(units[0].eval()(x), x)  # zero-initialised BN scale: the identity on non-negative input
    res.train()
    out = res(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (4, 24) and all(u.conv.weight.grad is not None for u in units)
    rows = describe(Classifier(res, 10), (3, 32, 32)).rows
    adds = [r for r in rows if r.fn == "Add (residual)"]
    assert [r.adds for r in adds] == [8 * 31 * 31, 8 * 31 * 31, 16 * 15 * 15]
    macs = {n: describe(Classifier(b, 10), (3, 32, 32)).totals["macs"] for n, b in (("plain", plain), ("res", res))}
    assert macs["res"] == macs["plain"]
    with pytest.raises(ClassforgeError, match="same.*padding"):
        create_backbone("cnn", pretrained=False, block="plainres", widths=[8, 16], depth=2, padding=0)


def test_test_time_augmentation_modes():
    """tta=flip averages the image and its mirror; flip-shift adds one-pixel shifts (reflect-padded) and their
    mirrors; flip-shift8 averages all nine one-pixel positions, each with its mirror. Both only at eval time; a mirror-symmetric input gives the same features with flip as without."""
    torch.manual_seed(0)
    plain = create_backbone("cnn_fast_256k", pretrained=False, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f0 = plain(x)
        ref_flip = 0.5 * (plain(x) + plain(x.flip(3)))
        xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        ul, dr = xp[..., :32, :32], xp[..., 2:, 2:]
        shifted = [plain(v) for v in (ul, ul.flip(3), dr, dr.flip(3))]
        ref_shift = 0.5 * ref_flip + 0.5 * torch.stack(shifted).mean(0)
        # flip-shift8: the image at each of its 8 one-pixel neighbours and itself, each with its mirror, equal weights
        nine = [xp[..., i:i + 32, j:j + 32] for i in range(3) for j in range(3)]
        ref_shift8 = torch.stack([plain(u) for v in nine for u in (v, v.flip(3))]).mean(0)
        assert torch.equal(nine[4], x)
        # flip-shift24: every position up to two pixels away (5 x 5, reflect-padded), each with its mirror
        xp2 = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
        grid = [xp2[..., i:i + 32, j:j + 32] for i in range(5) for j in range(5)]
        assert torch.equal(grid[12], x) and torch.equal(grid[6], nine[0])  # (-1, -1) is in both
        ref_shift24 = torch.stack([plain(u) for v in grid for u in (v, v.flip(3))]).mean(0)
        for mode, ref in (("flip", ref_flip), ("flip-shift", ref_shift), ("flip-shift8", ref_shift8),
                          ("flip-shift24", ref_shift24)):
            plain.tta = mode
            out = plain(x)
            assert torch.allclose(out, ref, atol=1e-5), mode
            assert not torch.allclose(out, f0, atol=1e-3), mode
        sym = torch.cat([x[..., :16], x[..., :16].flip(3)], dim=3)  # a mirror-symmetric image
        plain.tta = "none"
        a = plain(sym)
        plain.tta = "flip"
        assert torch.allclose(plain(sym), a, atol=1e-5)
        plain.train()
        assert plain(x).shape == (4, plain.feature_dim)  # training: one view per image
    with pytest.raises(ClassforgeError, match="tta must be one of"):
        create_backbone("cnn_fast_256k", pretrained=False, tta="crops")


def test_tta_views_count_the_forward_passes():
    """TTA_VIEWS (used to size scoring batches) equals the images each mode really sends through the network."""
    b = create_backbone("cnn", pretrained=False, widths=[4, 8], stem="whiten", global_pool="max").eval()
    seen = []
    b.stages[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    for mode in TTA_MODES:
        b.tta = mode
        seen.clear()
        with torch.no_grad():
            b(torch.randn(3, 3, 32, 32))
        assert sum(seen) == 3 * TTA_VIEWS[mode], mode


def test_plain_cnn_is_the_measured_family_scaled_to_the_budget():
    from classforge.models.small_cnn import MEASURED_FAMILY

    default = create_backbone("cnn", pretrained=False)
    assert {type(m).__name__ for m in default.modules()} >= {"PatchWhiten", "GELU"}
    def with_head(budget: int) -> int:  # training passes the class count, so the head counts in the budget
        b = create_backbone("cnn", pretrained=False, max_params=budget, num_classes=10)
        return count_params(Classifier(b, 10))["total"]

    assert 0.95 * 60_000 <= with_head(60_000) <= 60_000  # uses the budget, not a fixed net under it
    assert 0.95 * 256_000 <= with_head(256_000) <= 256_000
    # architecture arguments build from them instead, as before
    assert params_with_head("cnn", widths=[8, 16]) < 5_000
    assert MEASURED_FAMILY["block"] == "plainpool"


@pytest.mark.trains
def test_cnn_with_max_params_trains_with_the_measured_recipe(tiny, tmp_path):
    import json

    import classforge
    from classforge.core.config import TrainConfig

    run = classforge.train(tiny, tmp_path / "r", backbone="cnn", max_params=50_000, epochs=1, lr="0.05")
    cfg = TrainConfig.load(run / "config.yaml")
    assert (cfg.strategy, cfg.optimizer, cfg.schedule, cfg.cutout, cfg.label_smoothing) == \
        ("scratch", "sgd", "onecycle", 12, 0.2)
    assert cfg.lr == "0.05"  # what the user set stays
    params = json.loads((run / "summary.json").read_text())["params"]["total"]
    assert 0.9 * 50_000 <= params <= 50_000
