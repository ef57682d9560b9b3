"""Incremental PCA in PyTorch, as EVA uses it: PEFT 0.21's ``peft.utils.incremental_pca.IncrementalPCA`` (itself
adapted from scikit-learn's ``IncrementalPCA``), reduced to what EVA calls, with the same arithmetic so the
components match PEFT's bit for bit on the same inputs."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_lora.core.inits.svd_init import _fixed_seed

LOWRANK_SEED = 42  # PEFT's EVA seeds torch.svd_lowrank with 42


class IncrementalPCA:
    """Principal components of rows arriving batch by batch, each step from ``torch.svd_lowrank`` with
    ``q = 2 * n_components`` and 4 subspace iterations, seeded (every process computes the same components).

    Args:
        n_components: Number of components kept.

    Attributes:
        components_: ``[n_components, features]`` right singular vectors of the centred data seen so far.
        singular_values_: Their singular values.
        explained_variance_ratio_: Each component's share of the total variance.
    """

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.lowrank_q = 2 * n_components
        self.components_: Optional[torch.Tensor] = None
        self.singular_values_: Optional[torch.Tensor] = None
        self.explained_variance_ratio_: Optional[torch.Tensor] = None
        self.mean_: Optional[torch.Tensor] = None
        self.var_: Optional[torch.Tensor] = None
        self.n_samples_seen_: Optional[torch.Tensor] = None

    @staticmethod
    def _incremental_mean_and_var(
        X: torch.Tensor, last_mean: Optional[torch.Tensor], last_variance: Optional[torch.Tensor],
        last_sample_count: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        new_sample_count = torch.tensor([X.shape[0]], device=X.device)
        updated_sample_count = last_sample_count + new_sample_count
        if last_mean is None:
            last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
        else:
            last_sum = last_mean * last_sample_count
        new_sum = X.sum(dim=0, dtype=torch.float64)
        updated_mean = (last_sum + new_sum) / updated_sample_count
        T = new_sum / new_sample_count
        temp = X - T
        correction = temp.sum(dim=0, dtype=torch.float64).square()
        temp.square_()
        new_unnormalized_variance = temp.sum(dim=0, dtype=torch.float64)
        new_unnormalized_variance -= correction / new_sample_count
        if last_variance is None:
            updated_variance = new_unnormalized_variance / updated_sample_count
        else:
            last_unnormalized_variance = last_variance * last_sample_count
            last_over_new_count = last_sample_count.double() / new_sample_count
            updated_unnormalized_variance = (
                last_unnormalized_variance
                + new_unnormalized_variance
                + last_over_new_count / updated_sample_count * (last_sum / last_over_new_count - new_sum).square()
            )
            updated_variance = updated_unnormalized_variance / updated_sample_count
        return updated_mean, updated_variance, updated_sample_count

    def _svd(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _fixed_seed(X.device, LOWRANK_SEED):
            U, S, V = torch.svd_lowrank(X, q=self.lowrank_q, niter=4)
        return U, S, V.mH

    @staticmethod
    def _svd_flip(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # scikit-learn's sign convention (v-based): the largest entry of each component is positive.
        max_abs_rows = torch.argmax(torch.abs(v), dim=1)
        signs = torch.sign(v[range(v.shape[0]), max_abs_rows])
        u *= signs[: u.shape[1]].view(1, -1)
        v *= signs.view(-1, 1)
        return u, v

    def partial_fit(self, X: torch.Tensor) -> IncrementalPCA:
        """Update the components with one batch of rows ``X`` (``[samples, features]``, float32 or float64)."""
        X = X.clone()
        n_samples, n_features = X.shape
        if self.n_components > n_features or self.n_components > n_samples:
            raise ValueError(f"IncrementalPCA: n_components={self.n_components} exceeds the batch's "
                             f"{n_samples} rows or {n_features} features.")  # fmt: skip
        first_pass = self.components_ is None
        if first_pass:
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
        col_mean, col_var, n_total_samples = self._incremental_mean_and_var(
            X, self.mean_, self.var_, self.n_samples_seen_
        )
        if first_pass:
            X -= col_mean
        else:
            col_batch_mean = torch.mean(X, dim=0)
            X -= col_batch_mean
            mean_correction_factor = torch.sqrt((self.n_samples_seen_.double() / n_total_samples) * n_samples)
            mean_correction = mean_correction_factor * (self.mean_ - col_batch_mean)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X, mean_correction))
        U, S, Vt = self._svd(X)
        U, Vt = self._svd_flip(U, Vt)
        explained_variance_ratio = S**2 / torch.sum(col_var * n_total_samples)
        self.n_samples_seen_ = n_total_samples
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.mean_ = col_mean
        self.var_ = col_var
        self.explained_variance_ratio_ = explained_variance_ratio[: self.n_components]
        return self
