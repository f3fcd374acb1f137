"""Non-negative Lasso decomposition of PFVs into concept vectors (docs/method.md section 5).

For each PFV ``a`` (C,) and a shared dictionary ``V`` (K, C) of unit concept vectors::

    u(a) = argmin_{u >= 0}  1/2 ||a - V^T u||^2 + lambda ||u||_1

``lambda = lambda_rel * max_k <v_k, a>`` per PFV (scale-free), or an absolute ``lambda``.

The solver is Lawson-Hanson's active-set method, run on many PFVs at once (torch, CPU or GPU).
Each PFV keeps a support; each step adds the candidate atom whose gradient most violates the
optimality (KKT) conditions, and solves the non-negative problem on the support exactly (a small
batched ``s x s`` linear solve, stepping back to feasibility where a coefficient would turn
negative). Candidates start as the atoms most correlated with the PFV; when none of them
violates KKT, every one of the K atoms is checked through the residual (``<v_k, a - V^T u> -
lambda``, one dense product) and the violators become candidates. It stops when no atom violates
KKT by more than ``tol * ||a||``: the result is the exact Lasso solution, not an iterate. Codes
are sparse, so steps are few and cheap: they touch the support and the candidates, never all K. An active-set method rather than coordinate
descent: sibling concepts of bisecting k-means are nearly parallel (cosine 0.996 seen), which
makes coordinate descent crawl.

scikit-learn's ``Lasso`` minimises ``1/(2 C) ||y - Xw||^2 + alpha ||w||_1`` for a PFV of width C,
so its ``alpha`` equals ``lambda / C``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def objective(X: np.ndarray, V: np.ndarray, U: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Per-PFV objective ``1/2 ||a - V^T u||^2 + lambda ||u||_1`` (float64)."""
    X, V, U = (np.asarray(m, dtype=np.float64) for m in (X, V, U))
    residual = X - U @ V
    return 0.5 * (residual**2).sum(1) + np.broadcast_to(lam, (len(X),)) * np.abs(U).sum(1)


class NonNegativeLassoCoder:
    """Sparse non-negative coder over a fixed dictionary, with the scikit-learn ``transform`` verb.

    ``dictionary`` (K, C); ``lambda_rel`` (default 0.1) or ``lam`` (absolute, overrides);
    ``tol``: KKT violations below ``tol`` times the PFV's norm count as optimal;
    ``working_set``: candidate atoms per PFV to start with (its most correlated), ``grow``: the
    most violating atoms added per full KKT check;
    ``batch_size``: PFVs per solve; ``device``, ``dtype``: where and how precisely to solve;
    ``max_steps``: bound on active-set steps per batch (default ``4 K + 16``; Lawson-Hanson is finite).
    """

    def __init__(self, dictionary: np.ndarray, *, lambda_rel: float = 0.1, lam: float | None = None,
                 tol: float = 1e-6, working_set: int = 32, grow: int = 16, batch_size: int = 4096, device: str = "cpu",
                 dtype: torch.dtype = torch.float64, max_steps: int | None = None) -> None:
        V = np.asarray(dictionary, dtype=np.float32)
        if V.ndim != 2:
            raise ValueError(f"dictionary must be 2-D (concepts, channels), got shape {V.shape}")
        if not np.isfinite(V).all():
            raise ValueError("dictionary has NaN or infinite values")
        if lambda_rel < 0 or (lam is not None and lam < 0):
            raise ValueError("lambda must be non-negative")
        self.dictionary = V
        self.lambda_rel, self.lam = lambda_rel, lam
        self.tol = tol
        self.working_set, self.grow = working_set, grow
        self.batch_size, self.device = batch_size, torch.device(device)
        # float64 by default: the KKT test at tol 1e-6 would sit at float32's rounding.
        self.dtype = dtype
        self.max_steps = max_steps if max_steps is not None else 4 * len(V) + 16
        self._V = torch.from_numpy(V).to(self.device, dtype)
        self._G = self._V @ self._V.T

    def penalties(self, X: np.ndarray) -> np.ndarray:
        """The lambda of each PFV."""
        if self.lam is not None:
            return np.full(len(X), self.lam, dtype=np.float32)
        return self.lambda_rel * np.maximum((np.asarray(X, dtype=np.float32) @ self.dictionary.T).max(1), 0)

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dictionary.shape[1]:
            raise ValueError(
                f"PFVs must be (n, {self.dictionary.shape[1]}) to match the dictionary, got shape {X.shape}"
            )
        if not np.isfinite(X).all():
            raise ValueError(f"{int((~np.isfinite(X)).any(1).sum())} PFVs have NaN or infinite values")
        return X

    def encode(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sparse codes: ``(indices, values)``, each (n, m) with m the largest support (at least
        1); unused slots hold index -1 and value 0. Each row is sorted by decreasing value."""
        X = self._check(X)
        parts = []
        for first in range(0, len(X), self.batch_size):
            index, value = self._solve(torch.from_numpy(X[first : first + self.batch_size]).to(self.device, self.dtype))
            parts.append((index.cpu().numpy(), value.cpu().numpy()))
        width = max([1] + [p[0].shape[1] for p in parts])
        index = np.full((len(X), width), -1, dtype=np.int32)
        value = np.zeros((len(X), width), dtype=np.float32)
        first = 0
        for part_index, part_value in parts:
            order = np.argsort(-part_value, axis=1, kind="stable")
            part_value = np.take_along_axis(part_value, order, 1)
            part_index = np.take_along_axis(part_index, order, 1)
            rows = slice(first, first + len(part_index))
            index[rows, : part_index.shape[1]] = np.where(part_value > 0, part_index, -1)
            value[rows, : part_index.shape[1]] = np.where(part_value > 0, part_value, 0)
            first += len(part_index)
        return index, value

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Dense codes (n, K) float32."""
        index, value = self.encode(X)
        codes = np.zeros((len(index), len(self.dictionary)), dtype=np.float32)
        rows, slots = np.nonzero(index >= 0)
        codes[rows, index[rows, slots]] = value[rows, slots]
        return codes

    @torch.no_grad()
    def _solve(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lawson-Hanson on every PFV of the batch at once, over a working set of candidate atoms
        that grows by KKT violations. Returns (indices, values), (n, s); index -1 in unused slots."""
        n, K = len(X), len(self._V)
        V, G = self._V, self._G
        correlation = X @ V.T
        if self.lam is not None:
            lam = torch.full((n,), self.lam, dtype=X.dtype, device=X.device)
        else:  # as penalties(), from the same product
            lam = self.lambda_rel * correlation.max(1).values.clamp_min(0)
        b = correlation - lam[:, None]  # (n, K): the negative gradient at u = 0
        tol = self.tol * X.norm(dim=1).clamp_min(1e-12)
        index = torch.empty(n, 0, dtype=torch.long, device=X.device)  # support slots
        value = torch.empty(n, 0, dtype=X.dtype, device=X.device)
        # Candidates: the atoms most correlated with each PFV; the full check below adds others.
        candidates = torch.topk(b, min(self.working_set, K), dim=1).indices  # (n, m)
        rows = torch.arange(n, device=X.device)  # PFVs not yet optimal
        stalled = torch.zeros(n, dtype=torch.bool, device=X.device)
        steps = 0
        while len(rows) and steps < self.max_steps:
            # Lawson-Hanson restricted to the candidates, until none of them violates KKT.
            active = rows
            while len(active) and steps < self.max_steps:
                steps += 1
                slots, cand = index[active], candidates[active]
                grad = b[active[:, None], cand] - torch.einsum(
                    "rs,rsm->rm", value[active], G[slots.clamp_min(0)[:, :, None], cand[:, None, :]])
                taken = (cand[:, :, None] == slots[:, None, :]).any(2)
                best, position = grad.masked_fill(taken, -torch.inf).max(1)
                add = best > tol[active]
                active, atom = active[add], cand[add].gather(1, position[add, None])[:, 0]
                if not len(active):
                    break
                # One new slot per step (Lawson-Hanson adds one atom at a time: it is then
                # positive in the next solve, which is what makes the method finite).
                index = torch.cat([index, torch.full((n, 1), -1, dtype=index.dtype, device=X.device)], 1)
                value = torch.cat([value, torch.zeros(n, 1, dtype=X.dtype, device=X.device)], 1)
                index[active, -1] = atom
                slots = index[active]
                support = slots >= 0
                safe = slots.clamp_min(0)
                u = self._feasible_solve(G[safe[:, :, None], safe[:, None, :]], b[active[:, None], safe],
                                         value[active], support, tol[active])
                support &= u > 0
                value[active] = u * support
                index[active] = torch.where(support, slots, -1)
                # Rounding can leave the new atom at zero although its gradient was positive: that
                # PFV is optimal to within rounding, and would pick the same atom forever: it is
                # done (left in the search, it kept the whole batch stepping to max_steps).
                stalled[active[~support[:, -1]]] = True
                active = active[support[:, -1]]
                order = torch.argsort((index < 0).to(torch.int8), dim=1, stable=True)  # empty slots right
                index, value = index.gather(1, order), value.gather(1, order)
                width = int((index >= 0).sum(1).max())
                index, value = index[:, :width], value[:, :width]
            # KKT over all K atoms, through the residual: violators become candidates.
            residual = X[rows] - torch.einsum("rs,rsc->rc", value[rows], V[index[rows].clamp_min(0)])
            grad = residual @ V.T - lam[rows, None]
            in_support = torch.zeros(len(rows), K + 1, dtype=torch.bool, device=X.device)
            in_support.scatter_(1, torch.where(index[rows] >= 0, index[rows], K), True)
            grad = grad.masked_fill(in_support[:, :K], -torch.inf)
            worst, new = torch.topk(grad, min(self.grow, K), dim=1)
            violated = (worst[:, 0] > tol[rows]) & ~stalled[rows]
            rows, worst, new = rows[violated], worst[violated], new[violated]
            if not len(rows):
                break
            grown = candidates[:, :1].repeat(1, new.shape[1])  # rows that need none repeat a candidate
            grown[rows] = torch.where(worst > tol[rows, None], new, new[:, :1])
            candidates = torch.cat([candidates, grown], 1)
        short = int(stalled.sum()) + (len(rows) if steps >= self.max_steps else 0)
        if short:
            warnings.warn(f"non-negative Lasso: {short} of {n} PFVs stopped before the KKT tolerance "
                          f"({int(stalled.sum())} by rounding on a near-singular support, the rest at max_steps = "
                          f"{self.max_steps}); their codes are close to, not at, the optimum", stacklevel=3)
        return index, value

    @staticmethod
    def _feasible_solve(G: torch.Tensor, b: torch.Tensor, u: torch.Tensor, support: torch.Tensor,
                        tol: torch.Tensor) -> torch.Tensor:
        """Solve ``G_SS u_S = b_S`` on each support; where a coefficient would not be positive,
        move from ``u`` towards that solution up to the boundary and drop the atoms that reach
        zero, then solve again (Lawson-Hanson's inner loop)."""
        r, s = b.shape
        eye = torch.eye(s, dtype=b.dtype, device=b.device).expand(r, s, s)
        # A tiny ridge, always: a support whose atoms are linearly dependent (NMF's overcomplete
        # atoms at K = 8C hold exact twins and dependent triples; condition numbers of 1e16 were
        # seen) makes G_SS singular to rounding, and its solution then points anywhere. Along
        # such a null direction the Lasso objective falls linearly (the l1 term), and the ridge
        # turns the solution into a long step in that descent direction, which the step back
        # below stops at the first coefficient that reaches zero: Lawson-Hanson's own move. On
        # well-posed supports it shifts the gradient by 1e-10 |u|, far below the KKT tolerance.
        ridge = 1e-10 * G.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-30)
        for _ in range(s + 1):
            mask = support.to(b.dtype)
            system = G * mask[:, :, None] * mask[:, None, :] + eye * (1 - mask + ridge[:, None])[:, :, None]
            sol = torch.linalg.solve(system, (b * mask)[..., None])
            sol = sol[..., 0] * mask
            bad = support & (sol <= 0)
            fix = bad.any(1)
            if not fix.any():
                return sol
            u = torch.where(fix[:, None], u, sol)
            step = torch.where(bad, u / (u - sol).clamp_min(1e-300), torch.full_like(u, torch.inf))
            step = step.min(1).values.clamp(0, 1)
            u = torch.where(fix[:, None], u + step[:, None] * (sol - u), u)
            support = support & ~(fix[:, None] & (u <= tol[:, None] * 1e-3))
            u = u * support
        return u
