"""The constants of the VA-RED² gate and its rebuilds: what the search does not sample (S and λ_e are searched)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    """Constants of the gate and the rebuilds; not searched (S and λ_e are)."""

    hidden: int = 16  # D_h of Eq. 3.4
    time_bins: int = 2  # G pools space and keeps time in this many bins (the thesis keeps all T; a fixed
    #                    number of bins lets one gate serve any window length, deep layers with T=1 included)
    init_bias: float = 0.5  # β_p of the full alternatives at init, and the operating point that reads as V = 1
    #                        (V = max(tanh(·), 0) / tanh(init_bias)); the cheaper ones start at β_p = 0, V = 0
    init_gain: float = 0.0  # scale of the last FC's initial weights: 0, so that at conversion every input gets the
    #                        full alternatives alone and the converted network computes the dense one
    bias_gain: float = 20.0  # β_p = gain·b̃ with b̃ stored: Adam moves every parameter ~lr a step, so the
    #                          operating point of a gate moves gain× faster than its weights, enough to close
    #                          alternatives within the few epochs of a search trial (the thesis fine-tunes 40)
    channel_block: int = 16  # oneDNN computes output channels in blocks of the vector width (16 fp32 lanes with
    #                          AVX-512, 8 with AVX2): a conv's time moves in whole blocks (18 of 36 channels cost as
    #                          much as 32, docs/benchmarks.md), so channel alternatives keep whole blocks of 16,
    #                          whole on both; fixed, so that weights load on any machine
    min_share: float = 0.05  # convs with less than this share of the network's conv MACs stay dense: on a
    #                          CPU a gate's fixed cost (a dozen small ops) exceeds what it can save there
