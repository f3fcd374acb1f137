"""A sparse autoencoder (L1 or top-k), its encoder's own codes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from gig_dist.kernels.dictionaries.base import (
    Dictionary,
    _explained,
)


class SparseAutoencoderDictionary(Dictionary):
    """A sparse autoencoder trained in torch on the samples (Adam, at least ``steps`` batches):
    ``z = ReLU(W_e x + c)``, ``x^ = z D`` with unit-norm decoder rows ``D`` and an L1 penalty
    ``l1 * |z|_1`` (or only the ``top_k`` largest latents kept). No decoder bias, so that codes
    reconstruct ``X~ = U V`` as the pipeline assumes. Concept vectors are the decoder rows; codes
    are the encoder's own (largest first), not the Lasso's. ``loss_curve_`` holds the mean loss
    per epoch."""

    encode_params = ("lambda_rel", "lam", "tol", "batch_size", "device")
    stored_arrays = ("vector", "encoder", "encoder_bias", "size", "zero", "loss")
    own_params = ("l1", "top_k", "steps", "max_slots")

    def __init__(self, n_concepts: int = 8, *, seed: int = 0, n_init: int = 1, backend: str = "auto",
                 lambda_rel: float = 0.1, lam: float | None = None, tol: float = 1e-6, batch_size: int = 4096,
                 device: str = "cpu", refine_iter: int | None = None, l1: float = 0.03, top_k: int | None = None,
                 steps: int = 3000, max_slots: int = 32) -> None:
        super().__init__(n_concepts, seed=seed, n_init=n_init, backend=backend, lambda_rel=lambda_rel, lam=lam,
                         tol=tol, batch_size=batch_size, device=device, refine_iter=refine_iter)
        self.l1 = l1
        self.top_k = top_k
        self.steps = steps
        self.max_slots = max_slots

    def _codes(self, X: torch.Tensor) -> torch.Tensor:
        z = torch.relu(X @ self.encoder_.T + self.encoder_bias_)
        if self.top_k is not None:
            kept = torch.topk(z, self.top_k, dim=1)
            z = torch.zeros_like(z).scatter_(1, kept.indices, kept.values)
        return z

    def fit(self, X: np.ndarray) -> SparseAutoencoderDictionary:
        generator = torch.Generator().manual_seed(self.seed)
        device = torch.device(self.device if self.device != "auto" else "cpu")
        data = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
        n, c = data.shape
        scale = float(data.norm(dim=1).mean().clamp_min(1e-12))
        decoder = torch.randn(self.n_concepts, c, generator=generator).to(device)
        decoder /= decoder.norm(dim=1, keepdim=True)
        # tied start, scaled so that sum_k ReLU(<x, d_k>) d_k is about x for isotropic d_k
        encoder = (decoder * (2 * c / self.n_concepts)).clone().requires_grad_(True)
        decoder.requires_grad_(True)
        bias = torch.zeros(self.n_concepts, device=device, requires_grad=True)
        optimiser = torch.optim.Adam([encoder, decoder, bias], lr=3e-3)
        loss_curve = []
        batch = min(256, n)
        epochs = max(1, -(-self.steps // -(-n // batch)))  # at least ``steps`` optimiser steps
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(device)
            total = 0.0
            for first in range(0, n, batch):
                x = data[order[first : first + batch]] / scale
                z = torch.relu(x @ encoder.T + bias)
                if self.top_k is not None:
                    kept = torch.topk(z, self.top_k, dim=1)
                    z = torch.zeros_like(z).scatter(1, kept.indices, kept.values)
                unit = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
                loss = ((z @ unit - x) ** 2).sum(1).mean() + (0 if self.top_k is not None else self.l1 * z.abs().sum(1).mean())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(x)
            loss_curve.append(total / n)
        with torch.no_grad():
            unit = (decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)).cpu().numpy()
            # trained on x / scale: scale * ReLU(W (x / scale) + c) = ReLU(W x + scale c)
            self.encoder_ = encoder.detach().cpu()
            self.encoder_bias_ = (bias * scale).detach().cpu()
        self.dictionary_ = unit.astype(np.float32)
        self.zero_ = np.zeros(self.n_concepts, dtype=bool)
        self.loss_curve_ = loss_curve
        codes = self._codes(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        self.labels_ = codes.argmax(1).numpy()
        self.cluster_size_ = np.bincount(self.labels_, minlength=self.n_concepts)
        self.explained_ = _explained(np.asarray(X, dtype=np.float64), (codes @ torch.from_numpy(unit)).numpy())
        return self

    def encode(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self, "encoder_")
        z = self._codes(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        slots = min(self.max_slots, self.n_concepts)
        values, index = torch.topk(z, slots, dim=1)
        index = torch.where(values > 0, index, torch.full_like(index, -1))
        return index.numpy().astype(np.int32), torch.where(values > 0, values, 0).numpy().astype(np.float32)

    def fitted_arrays(self) -> dict[str, np.ndarray]:
        return {**super().fitted_arrays(), "encoder": self.encoder_.numpy(), "encoder_bias": self.encoder_bias_.numpy(),
                "size": self.cluster_size_, "zero": self.zero_, "loss": np.asarray(self.loss_curve_)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], **params: Any) -> SparseAutoencoderDictionary:
        dictionary = super().from_arrays(arrays, **params)
        dictionary.n_concepts = len(dictionary.dictionary_)
        dictionary.encoder_ = torch.from_numpy(np.asarray(arrays["encoder"], dtype=np.float32))
        dictionary.encoder_bias_ = torch.from_numpy(np.asarray(arrays["encoder_bias"], dtype=np.float32))
        return dictionary

    def fit_statistics(self) -> dict[str, Any]:
        sizes = self.cluster_size_
        return {"k": int(self.n_concepts), "samples": int(sizes.sum()), "mean_members": float(sizes.mean()),
                "singletons": int((sizes == 1).sum()), "zero_concepts": int((sizes == 0).sum()),
                "explained": self.explained_, "loss_first": self.loss_curve_[0], "loss_last": self.loss_curve_[-1]}
