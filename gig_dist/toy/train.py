"""Train the toy model on the toy world and save the weights that ship in the package.

    python -m gig_dist.toy.train                       # writes gig_dist/toy/toy_resnet.pt
    python -m gig_dist.toy.train --out my.pt --steps 3000

Training images come from world seed ``TRAIN_SEED``; held-out evaluation uses ``HELDOUT_SEED``,
a different world, so no evaluation image was ever seen in training. Deterministic given --seed
(on CPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gig_dist.toy.model import ToyResNet, shipped_weights_path
from gig_dist.toy.world import TOY_MEAN, TOY_STD, render_batch

TRAIN_SEED = 1
HELDOUT_SEED = 2


def to_model_input(images_nhwc: np.ndarray) -> torch.Tensor:
    """Toy images (N, H, W, 3) in [0, 1] -> normalised model input (N, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(TOY_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TOY_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def heldout_accuracy(model: nn.Module, num_images: int = 1024, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, num_images, batch_size):
        images, _, labels = render_batch(HELDOUT_SEED, range(start, min(start + batch_size, num_images)))
        correct += int((model(to_model_input(images)).argmax(1).numpy() == labels).sum())
    return correct / num_images


def train(steps: int, batch_size: int, seed: int, log_every: int = 100) -> ToyResNet:
    torch.manual_seed(seed)
    model = ToyResNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for step in range(steps):
        model.train()
        # Every step sees fresh images: the world is unbounded, so there is nothing to overfit.
        first = step * batch_size
        images, _, labels = render_batch(TRAIN_SEED, range(first, first + batch_size))
        loss = loss_fn(model(to_model_input(images)), torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=shipped_weights_path())
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = train(args.steps, args.batch_size, args.seed)
    accuracy = heldout_accuracy(model)
    print(f"held-out accuracy: {accuracy:.4f}")
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
