"""Heavy checks, skipped in CI; run them with `pytest -m slow`."""

import subprocess
import sys

import pytest
import torch
import torchvision

from gig_dist.kernels.srd import SRD
from gig_dist.toy.model import load_toy_model
from gig_dist.toy.train import heldout_accuracy

pytestmark = pytest.mark.slow


def test_training_script_reproduces_the_shipped_accuracy(tmp_path):
    """`python -m gig_dist.toy.train` from scratch (about 3 minutes on 2 cores) reaches >= 95%."""
    out = tmp_path / "toy.pt"
    done = subprocess.run([sys.executable, "-m", "gig_dist.toy.train", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert heldout_accuracy(load_toy_model(out), num_images=1024) >= 0.95


def test_srd_conserves_relevance_on_resnet50_at_224():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    d = SRD(model).decompose(torch.randn(2, 3, 224, 224))
    classes = d.logits.argmax(1)
    logit = d.logits[torch.arange(2), classes]
    assert torch.allclose(d.pixel_relevance(classes).sum((1, 2)), logit, rtol=1e-3, atol=1e-4)
    maps = d.ierf("layer4.2", torch.tensor([[0, 24], [48, 10]]))
    assert torch.allclose(maps.sum((2, 3)), torch.ones(2, 2), atol=1e-4)
