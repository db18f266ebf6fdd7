"""Per-epoch training state: continuing from a saved epoch gives the weights of a run that never stopped."""

import pytest
import torch

from gatesearch.data.source import load_clips, num_classes
from gatesearch.models import build_model
from gatesearch.policies import POLICIES
from gatesearch.search.checkpoint import TrainState, latest_checkpoint
from gatesearch.search.trial import train
from gatesearch.spaces import DataConfig, TrialConfig

DATA = DataConfig(train_clips=16, synthetic={"height": 32, "width": 32})


@pytest.mark.parametrize("gate", ["dense", "gumbel"])  # gumbel draws its noise from torch's global generator
def test_continuing_from_a_saved_epoch_matches_the_uninterrupted_run(tmp_path, gate):
    cfg = TrialConfig(backbone="tiny", gate=gate, knobs=POLICIES.get(gate).example_knobs(), epochs=4,
                      clip_length=2, lr=0.005)
    clips = load_clips(DATA, frames=cfg.clip_length, count=DATA.train_clips, split="train")
    torch.manual_seed(0)
    straight = build_model(cfg, num_classes(DATA))
    saved: list[TrainState] = []
    loss = train(straight, cfg, clips, save_state=saved.append)
    assert [s.epoch for s in saved] == [1, 2, 3]  # none after the last epoch: the trial reports its model then

    saved[1].save(tmp_path)
    state = TrainState.load(tmp_path)
    assert state is not None and state.epoch == 2
    torch.manual_seed(1)  # another initialisation, another global generator: the state overrides both
    resumed = build_model(cfg, num_classes(DATA))
    epochs_run = []
    assert train(resumed, cfg, clips, resume=state, on_epoch=lambda e, _: epochs_run.append(e)) == loss
    assert epochs_run == [2, 3]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_cut_short_reads_as_absent(tmp_path):
    cfg = TrialConfig(backbone="tiny", gate="dense", epochs=3, clip_length=2, lr=0.005)
    clips = load_clips(DATA, frames=2, count=8, split="train")
    saved: list[TrainState] = []
    train(build_model(cfg, num_classes(DATA)), cfg, clips, save_state=saved.append)
    for i, state in enumerate(saved):
        (tmp_path / f"checkpoint_00000{i}").mkdir()
        state.save(tmp_path / f"checkpoint_00000{i}")
    folder, state = latest_checkpoint(tmp_path)
    assert folder.name == "checkpoint_000001" and state.epoch == 2
    tensors = folder / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10])  # the copy was cut short
    folder, state = latest_checkpoint(tmp_path)
    assert folder.name == "checkpoint_000000" and state.epoch == 1
    (folder / "state.json").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_a_checkpoint_from_another_grouping_trains_from_the_start(tmp_path):
    """A Gumbel state saved when all parameters shared one learning rate (before ``Policy.lr_scales``) does not
    fit today's two optimiser groups: the trial warns and trains from epoch 0 instead of failing half-restored."""
    cfg = TrialConfig(backbone="tiny", gate="gumbel", knobs=POLICIES.get("gumbel").example_knobs(), epochs=3,
                      clip_length=2, lr=0.005)
    clips = load_clips(DATA, frames=cfg.clip_length, count=DATA.train_clips, split="train")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes(DATA))
    one_group = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(one_group, max_lr=cfg.lr, total_steps=10)
    old = TrainState.capture(epoch=2, loss=1.0, model=model, optimizer=one_group, scheduler=sched,
                             generator=torch.Generator())
    epochs_run = []
    with pytest.warns(UserWarning, match="does not fit"):
        train(model, cfg, clips, resume=old, on_epoch=lambda e, _: epochs_run.append(e))
    assert epochs_run == [0, 1, 2]
