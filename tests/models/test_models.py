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


class TinyNet(torch.nn.Module):
    """A user's own classifier, no torchvision or timm block in it: a stem, a trunk of blocks, a
    pooled linear head."""

    def __init__(self, width: int = 16, classes: int = 8) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, stride=2, padding=1), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(*[torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, stride=2 if i else 1, padding=1), torch.nn.BatchNorm2d(width),
            torch.nn.ReLU()) for i in range(3)])
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def tiny_net(width: int = 16, classes: int = 8) -> torch.nn.Module:
    """``model.name = tests.models.test_models:tiny_net``."""
    return TinyNet(width, classes)


def not_a_module() -> str:
    return "a string"


def broken_factory() -> torch.nn.Module:
    raise RuntimeError("no GPU here")


FACTORY = ("model.name=tests.models.test_models:tiny_net", "model.weights=none", "model.kwargs={width: 12}",
           "transform.resize=64", "transform.crop=64", "transform.mean=[0.5,0.5,0.5]", "transform.std=[0.25,0.25,0.25]")


def test_a_factory_of_a_users_module_builds_the_same_seeded_model_everywhere():
    config = ModelConfig(name="tests.models.test_models:tiny_net", weights=None, kwargs={"width": 12})
    first, second = build_model(config), build_model(config)
    assert isinstance(first, TinyNet) and first.head.in_features == 12 and not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    from gig_dist.kernels.taps import block_names

    assert block_names(first) == ["blocks.0", "blocks.1", "blocks.2"]


@pytest.mark.parametrize(("name", "weights", "message"), [
    ("tests.models.test_models:not_a_module", None, "returned a str, not a torch nn.Module"),
    ("tests.models.test_models:broken_factory", None, "the factory raised RuntimeError: no GPU here"),
    ("tests.models.test_models:nothing_here", None, "tests.models.test_models has no nothing_here"),
    ("no_such_package.models:build", None, "cannot import no_such_package.models"),
    ("tests.models.test_models:tiny_net", "DEFAULT", "a factory has no named weights"),
    ("timm:no_such_net_at_all", None, "timm has no model 'no_such_net_at_all'"),
    ("timm:resnet18", "IMAGENET1K_V1", "timm models take 'pretrained'"),
])
def test_models_that_cannot_be_built_are_refused_in_one_line(name, weights, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_model(ModelConfig(name=name, weights=weights))
    assert "\n" not in str(caught.value)


def test_weights_that_do_not_fit_a_factorys_model_are_named(tmp_path):
    torch.save(TinyNet(width=8).state_dict(), tmp_path / "w8.pt")
    with pytest.raises(ConfigError, match=r"does not fit the model: shape mismatch at"):
        build_model(ModelConfig(name="tests.models.test_models:tiny_net", weights=str(tmp_path / "w8.pt"), kwargs={"width": 12}))
    build_model(ModelConfig(name="tests.models.test_models:tiny_net", weights=str(tmp_path / "w8.pt"), kwargs={"width": 8}))


def test_a_factorys_preprocessing_must_be_given_and_another_checkpoint_redoes_the_store(tmp_path):
    from gig_dist.config import load_config
    from gig_dist.models.loading import resolve_transform
    from gig_dist.stages.extract import ExtractStage

    with pytest.raises(ConfigError, match=r"its preprocessing is not known to gig-dist; set transform.resize, "
                                          r"transform.crop, transform.mean, transform.std"):
        resolve_transform(load_config(None, ["model.name=tests.models.test_models:tiny_net", "model.weights=none"]))
    assert resolve_transform(load_config(None, list(FACTORY))).crop == 64
    torch.save(TinyNet(width=12).state_dict(), tmp_path / "w.pt")
    keys = ExtractStage.key_values(load_config(None, [*FACTORY, f"model.weights={tmp_path / 'w.pt'}"]))
    torch.save(TinyNet(width=12, classes=8).state_dict() | {"head.bias": torch.ones(8)}, tmp_path / "w.pt")
    again = ExtractStage.key_values(load_config(None, [*FACTORY, f"model.weights={tmp_path / 'w.pt'}"]))
    assert keys["model.weights_sha256"] != again["model.weights_sha256"] and len(again["model.weights_sha256"]) == 64
    # Stores made before these keys keep their fingerprint: the toy default's keys are the same.
    assert "model.kwargs" not in ExtractStage.key_values(load_config(None, []))


class StubbornNet(TinyNet):
    def train(self, mode: bool = True):  # a model that will not leave training mode
        return super().train(True)


def stubborn_net() -> torch.nn.Module:
    return StubbornNet()


def test_a_model_that_stays_in_training_mode_is_refused():
    with pytest.raises(ConfigError, match="stays in training mode after model.eval"):
        build_model(ModelConfig(name="tests.models.test_models:stubborn_net", weights=None))
