"""The constants of the D-STEP gate and its loss: what the search does not sample (D and p are searched)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DStepSettings:
    """Constants of the gate and its loss (D-STEP, Eq. 3); D and p are searched, these are not.

    Scaled for CPU trials of a few epochs: the paper warms up K = 10 of 50 epochs.
    """

    temperature: float = 2 / 3  # τ of both relaxations (only shapes the backward pass)
    hidden_min: int = 16  # MLP hidden width: max(hidden_min, C_in // 2)
    spatial_init: float | None = None  # spatial logit bias at start; None: logit(D), so tiles start active at
    #                                   the target rate ("the spatial sparsity has to be properly initialized")
    compute_init: float = 3.0  # "compute" logit bias at start (skip, reuse start at 0)
    bias_gain: float = 100.0  # logit biases stored / gain: under Adam they move gain× faster than weights,
    #                          so decisions can shift within the few dozen steps of a CPU trial
    warmup_epochs: int = 1  # K: λ(e) = 0 for e < K (task and bound losses only)
    lambda_alpha: float = 4.0  # α of λ(e) = α·exp(β·e)
    lambda_beta: float = 0.3  # β of λ(e) (not the joint-space β of the Gumbel gate)
    gamma: float = 2.0  # γ: weight of L_bound
    bound_start: float = 0.1  # L_bound: each block's spatial density is held to [D·(1-r), D + (1-D)·r], r growing
    bound_end: float = 0.5  # linearly from bound_start to bound_end over training; r < 1 keeps any block from
    #                         collapsing to all-off or all-on tiles (which would be layer skipping, not tiles)
    freeze_bn: float | None = 0.8  # from this fraction of training on, batch norm runs on its running statistics,
    #                               so training sees the FLOPs that inference will spend (decisions near the
    #                               threshold flip between batch and running statistics); None: never
    control_gain: float = 1.0  # integral control of the operating point: after each step every block's logit
    #                            offset moves by -gain·(F/F_S - D) of the batch (0: Eq. 3 alone; see policies.dstep)
    noise_off: float | None = 0.6  # Gumbel noise scale falls linearly from 1 to 0 at this fraction of training,
    #                                so the rest trains the decisions inference makes (rounding / argmax) while
    #                                the learning rate can still correct the FLOPs; None: noise throughout
