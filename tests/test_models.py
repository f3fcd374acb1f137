import pickle

import pytest
import torch
import torchvision

from gig_dist.config import ConfigError, ModelConfig
from gig_dist.models.loading import build_model, resolve_torchvision_weights
from gig_dist.toy.model import ToyResNet

pytestmark = pytest.mark.fast


def _perturbed_toy_state():
    torch.manual_seed(1)
    state = ToyResNet().state_dict()
    return {k: (v + torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v for k, v in state.items()}


def _assert_weights(model, state):
    own = model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in state)


def test_toy_weights_from_a_local_state_dict_file(tmp_path):
    state = _perturbed_toy_state()
    path = tmp_path / "toy.pt"
    torch.save(state, path)
    _assert_weights(build_model(ModelConfig(name="toy", weights=str(path))), state)


@pytest.mark.parametrize("wrap", ["state_dict", "module_prefix"])
def test_checkpoint_wrappers_are_unwrapped(tmp_path, wrap):
    state = _perturbed_toy_state()
    saved = {"state_dict": state, "epoch": 3} if wrap == "state_dict" else {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(saved, path)
    _assert_weights(build_model(ModelConfig(name="toy", weights=str(path))), state)


def test_torchvision_model_from_a_local_state_dict_file(tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(name="resnet18", weights=str(path), num_classes=10))
    _assert_weights(model, reference.state_dict())
    assert not model.training


def test_head_size_mismatch_names_num_classes(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError, match=r"shape mismatch at fc\.(weight|bias).*model\.num_classes"):
        build_model(ModelConfig(name="resnet18", weights=str(path)))


def test_missing_state_dict_file(tmp_path):
    with pytest.raises(ConfigError, match="state-dict file not found"):
        build_model(ModelConfig(name="toy", weights=str(tmp_path / "absent.pt")))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload()}, handle)
    with pytest.raises(ConfigError, match="weights_only=True"):
        build_model(ModelConfig(name="toy", weights=str(path)))


def test_torchvision_weights_resolve_by_name_without_download():
    assert resolve_torchvision_weights("resnet50", "IMAGENET1K_V2") is torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert resolve_torchvision_weights("resnet50", "DEFAULT") is torchvision.models.ResNet50_Weights.DEFAULT
    with pytest.raises(ConfigError, match="valid: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        resolve_torchvision_weights("resnet50", "IMAGENET9K")


def test_unknown_model_name_suggests():
    with pytest.raises(ConfigError, match="Did you mean: resnet50"):
        build_model(ModelConfig(name="resnet5O", weights=None))


def test_random_weights():
    model = build_model(ModelConfig(name="resnet18", weights=None))
    assert isinstance(model, torchvision.models.ResNet)


@pytest.mark.parametrize("name", ["toy", "resnet18"])
def test_random_weights_are_the_same_in_every_process(name):
    """Each stage and worker builds the model itself: random weights that followed the
    process's RNG would give PFVs of one model and GIG of another. They come from a fixed seed,
    and building them leaves the caller's RNG where it was."""
    torch.manual_seed(1)
    first = build_model(ModelConfig(name=name, weights=None)).state_dict()
    after = torch.rand(3)
    torch.manual_seed(2)
    torch.rand(100)
    second = build_model(ModelConfig(name=name, weights=None)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)  # the caller's RNG is untouched


def test_weights_that_are_a_device_are_named_as_such():
    """model.weights=/dev/zero said 'not found'."""
    with pytest.raises(ConfigError, match="/dev/zero is a character device, not a regular file"):
        build_model(ModelConfig(name="toy", weights="/dev/zero"))
