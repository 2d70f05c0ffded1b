"""Pure loss functions (no modules, no state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_matching_loss(velocity_pred: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """E ||v_theta(x_t, t) - (noise - x)||^2, mean over elements, in fp32."""
    return F.mse_loss(velocity_pred.float(), (noise - x).float())
