"""How big a fidelity run is: the sizes, sweeps and seeds of every finding, one frozen profile per run length.

``quick`` must finish in 15 minutes on 2 CPU cores (CI runs it whole as a slow test; measured 6:37 with both dense
networks trained; ``estimate_s`` holds a run's times per finding, and every report states how long it took, and on
what), ``full`` is the quick run's networks with longer sweeps, fine-tunings, held-out sets and timings (12
minutes), ``smoke`` is the smallest run that still exercises every finding (unit tests use it: its numbers mean
little). The report prints the whole profile, so a reader can re-run any figure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .networks import NetworkSpec


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Side-by-side wall-clock (``objectives.bench.bench_model``), holding the device lock."""

    frames: int = 32  # frames of the timed clip
    repeats: int = 10  # interleaved dense / gated rounds; the speedup is the median of per-round ratios
    threads: int = 0  # torch threads of both models (0: every core of the machine, as a deployed model gets)


@dataclass(frozen=True, kw_only=True)
class Profile:
    name: str
    seed: int = 0  # weights, gate initialisation and data order of every training
    # 1. keep-all equivalence: every registered backbone at this size and width, every gate that converts it
    equivalence_size: int = 32
    equivalence_frames: int = 3
    equivalence_width: float = 0.25
    equivalence_backbones: tuple[str, ...] = ()  # empty: every registered backbone
    # the per-frame network of the Skip-Conv and D-STEP findings (2, 3, 4, 5; 7 for those gates)
    frame_net: NetworkSpec
    # the clip network of the VA-RED² finding (6; 7 for that gate)
    clip_net: NetworkSpec
    sweep_points: int = 6  # thresholds per norm-gate sweep (log-spaced over the span where MACs move)
    calibration_clips: int = 4  # training clips that find a norm gate's threshold span
    bisect_steps: int = 10  # bisection steps to a common MAC fraction on the timed clip (Table 3's timing)
    # Gumbel β of the Fig. 7 sweep. Larger β buys little here: 3 epochs from the quick network (2026-12-06, after
    # the gate started as Input-Norm) gave MACs 0.53 / 0.50 / 0.49 of dense at β 0.3 / 3 / 30 (PCK 0.99 / 0.96 / 0.93)
    betas: tuple[float, ...] = (0.03, 0.1, 0.3)
    finetune_epochs: int = 3  # epochs of every gate fine-tuning from the shared network (Gumbel, D-STEP)
    finetune_lr: float = 1e-3
    block_sizes: tuple[int, ...] = (1, 2, 4, 8)  # Table 3
    block_gate: str = "output_norm"  # the gate of the block-size sweep (a threshold gives equal MACs exactly)
    clip_lengths: tuple[int, ...] = (4, 8)  # T_train of Table 4
    reference_periods: tuple[int, ...] = (4, 8, 0)  # T_test of Table 4 (0: the first frame only, T = ∞)
    long_frames: int = 32  # frames of the Table 4 test streams
    clip_length_beta: float = 0.1  # β of the Table 4 Gumbel gates (one of ``betas``: the T = 4 model is shared)
    dstep_targets: tuple[float, ...] = (0.4, 0.6, 0.8)  # D of Table 1
    dstep_tile: int = 2  # tile side p
    vared2_sizes: tuple[int, ...] = (2, 3)  # S of Table 4.1
    vared2_lambda: float = 0.1  # λ_e of Eq. 3.6
    vared2_epochs: int = 4  # fine-tuning epochs from the dense clip network
    # torch threads of every training and quality measurement (timing has its own): these networks' ops are too
    # small to share between cores, and a second thread stalls whenever another process takes a core (measured on
    # this 2-core machine under load: a Gumbel fine-tuning epoch 1.7 s on 1 thread, 11-141 s on 2)
    work_threads: int = 1
    timing: Timing = field(default_factory=Timing)
    estimate_s: dict[str, float] = field(default_factory=dict)  # expected seconds per finding (2 quiet cores)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("estimate_s")
        return out


FRAME_NET = NetworkSpec(backbone="hrnet_small", task="heatmap", size=64, train_clips=192, epochs=6, clip_length=4,
                        val_clips=32, val_frames=16)
CLIP_NET = NetworkSpec(backbone="r2plus1d_tiny", task="classification", size=48, train_clips=192, epochs=6,
                       clip_length=8, val_clips=120, val_frames=16)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", equivalence_size=32, equivalence_frames=2, equivalence_width=0.25,
        equivalence_backbones=("hrnet_small", "resnet18_tiny", "r2plus1d_tiny"),  # every gate, 2D and 3D
        frame_net=dataclasses.replace(FRAME_NET, size=32, train_clips=16, epochs=1, val_clips=4, val_frames=8),
        clip_net=dataclasses.replace(CLIP_NET, size=32, train_clips=16, epochs=1, val_clips=8, val_frames=8),
        sweep_points=3, calibration_clips=2, bisect_steps=5, betas=(0.1,), finetune_epochs=1, block_sizes=(1, 4),
        clip_lengths=(2, 4),
        reference_periods=(2, 4, 0), long_frames=8, clip_length_beta=0.1, dstep_targets=(0.4, 0.8), vared2_epochs=1,
        vared2_sizes=(2, 3), timing=Timing(frames=8, repeats=2),
        estimate_s={"keep_all": 20, "gate_fronts": 20, "block_size": 10, "clip_length": 10, "dstep_target": 10,
                    "vared2_space": 20, "wallclock": 10},
    ),
    "quick": Profile(
        name="quick", frame_net=FRAME_NET, clip_net=CLIP_NET,
        # measured on 2 quiet cores (docs/fidelity.md, 2026-12-06 08:13): 0:14, 1:12, 0:32, 0:41, 0:49, 1:48, 0:14
        estimate_s={"keep_all": 15, "gate_fronts": 75, "block_size": 35, "clip_length": 45, "dstep_target": 50,
                    "vared2_space": 110, "wallclock": 15},
    ),
    "full": Profile(
        name="full", equivalence_size=64, equivalence_frames=4, equivalence_width=1.0,
        # the quick run's networks, judged on 3× the held-out clips: at 128² on 512 clips (and the clip net at 64²
        # on 640) the dense networks scored PCK 1.000 and top-1 100 % (run of 2026-12-06 08:28), so every gate
        # matched dense at every cost and the quality findings compared ceilings. What grows is the sweeps, the
        # fine-tunings, the statistics and the timing.
        frame_net=dataclasses.replace(FRAME_NET, val_clips=96),
        clip_net=dataclasses.replace(CLIP_NET, val_clips=240),
        sweep_points=10, betas=(0.01, 0.03, 0.1, 0.3, 1.0), finetune_epochs=6, long_frames=48,
        vared2_epochs=6, timing=Timing(frames=64, repeats=20),
        # measured on 2 cores with only nice-19 jobs beside it (docs/fidelity.md, 2026-12-06 11:48; both dense
        # networks trained in it): 11:54 in all
        estimate_s={"keep_all": 120, "gate_fronts": 175, "block_size": 90, "clip_length": 85,
                    "dstep_target": 85, "vared2_space": 135, "wallclock": 30},
    ),
}


def get_profile(name: str) -> Profile:
    from gatesearch.registry import UnknownNameError

    if name not in PROFILES:
        raise UnknownNameError(f"unknown fidelity profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


__all__ = ["PROFILES", "Profile", "Timing", "get_profile"]
