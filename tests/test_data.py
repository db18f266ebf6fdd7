"""Tests for gatesearch.data: synthetic clips (determinism, labels, geometry) and PyAV IO."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from gatesearch.data import (
    SyntheticConfig,
    SyntheticVideo,
    VideoDecodeError,
    iter_frames,
    make_clip,
    read_frames,
    video_info,
    write_video,
)
from gatesearch.data.synthetic import DIRECTIONS

CFG = SyntheticConfig()


# ----------------------------------------------------------------------------- synthetic


def test_item_shapes_and_dtypes():
    item = make_clip(CFG, 0)
    assert set(item) == {"clip", "label", "centers", "heatmap"}
    assert item["clip"].shape == (16, 3, 64, 64) and item["clip"].dtype == torch.float32
    assert item["label"].shape == () and item["label"].dtype == torch.int64
    assert item["centers"].shape == (16, 2) and item["centers"].dtype == torch.float32
    assert item["heatmap"].shape == (16, 1, 16, 16) and item["heatmap"].dtype == torch.float32
    assert 0.0 <= item["clip"].min() and item["clip"].max() <= 1.0


def test_non_square_and_other_sizes():
    cfg = SyntheticConfig(height=32, width=48, frames=4, heatmap_stride=8)
    item = make_clip(cfg, 5)
    assert item["clip"].shape == (4, 3, 32, 48)
    assert item["heatmap"].shape == (4, 1, 4, 6)


def test_deterministic_and_split_dependent():
    a, b = make_clip(CFG, 7, "train"), make_clip(CFG, 7, "train")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for split in ("val", "test"):
        assert not torch.equal(a["clip"], make_clip(CFG, 7, split)["clip"])
    assert not torch.equal(a["clip"], make_clip(CFG, 8, "train")["clip"])
    other_seed = SyntheticConfig(seed=1)
    assert not torch.equal(a["clip"], make_clip(other_seed, 7, "train")["clip"])


def test_dataset_matches_make_clip_and_batches():
    ds = SyntheticVideo(CFG, size=10, split="val")
    assert len(ds) == 10 and ds.num_classes == CFG.num_classes == 12
    assert torch.equal(ds[3]["clip"], make_clip(CFG, 3, "val")["clip"])
    assert torch.equal(ds[-1]["clip"], ds[9]["clip"])
    with pytest.raises(IndexError):
        ds[10]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["clip"].shape == (4, 16, 3, 64, 64) and batch["label"].shape == (4,)


@pytest.mark.parametrize("shapes,dirs", [(3, 4), (4, 8), (2, 2), (3, 1)])
def test_labels_cover_range_and_motion_follows_label(shapes, dirs):
    cfg = SyntheticConfig(num_shapes=shapes, num_directions=dirs, frames=8)
    labels = set()
    for i in range(2 * cfg.num_classes):
        item = make_clip(cfg, i)
        label = int(item["label"])
        assert 0 <= label < cfg.num_classes
        labels.add(label)
        _, dx, dy = DIRECTIONS[label % dirs]
        move = (item["centers"][-1] - item["centers"][0]).double()
        assert move.norm() > 0.8 * cfg.speed * (cfg.frames - 1)
        cos = (move[0] * dx + move[1] * dy) / move.norm()
        assert cos > 0.97, (i, label, move)
    assert labels == set(range(cfg.num_classes))


def test_object_stays_inside_frame_even_when_tiny():
    for cfg in (CFG, SyntheticConfig(height=16, width=16, frames=16, speed=3.0)):
        for i in range(8):
            c = make_clip(cfg, i)["centers"]
            assert (c >= 0).all() and (c[:, 0] <= cfg.width - 1).all()
            assert (c[:, 1] <= cfg.height - 1).all()


def test_object_size_scales_the_object_and_keeps_the_default_clips():
    """The default draws exactly the clips it drew before the knob existed; a smaller size paints a smaller object."""
    base = make_clip(CFG, 5, "train")
    same = make_clip(SyntheticConfig(**{**CFG.to_dict(), "object_size": 0.25}), 5, "train")
    assert torch.equal(base["clip"], same["clip"])
    still = {"noise": 0.0, "camera_motion": 0.0, "height": 64, "width": 64}
    area = {}
    for size in (0.1, 0.25):
        item = make_clip(SyntheticConfig(**{**CFG.to_dict(), **still, "object_size": size}), 5, "train")
        area[size] = float((item["clip"][1] - item["clip"][0]).abs().sum(0).gt(0.05).float().sum())  # moved pixels
    assert 0 < area[0.1] < 0.6 * area[0.25]


def test_heatmap_peak_at_centre():
    s = CFG.heatmap_stride
    for i in range(6):
        item = make_clip(CFG, i)
        heat = item["heatmap"][:, 0]  # (T, h, w)
        t, h, w = heat.shape
        flat = heat.reshape(t, -1).argmax(dim=1)
        peak = torch.stack([flat % w, flat // w], dim=1).float()  # (T, 2) as (x, y)
        expected = (item["centers"] - (s - 1) / 2) / s
        assert (peak - expected).abs().max() <= 1.0
        assert torch.allclose(heat.amax(dim=(1, 2)), torch.ones(t))


def test_temporal_redundancy_and_object_motion():
    for i in range(6):
        item = make_clip(CFG, i)
        clip, centres = item["clip"], item["centers"]
        diff = (clip[1:] - clip[:-1]).abs().mean(dim=1)  # (T-1, H, W)
        assert diff.median() < 0.05  # background: only drift + noise
        for t in (0, 7, 14):
            x, y = (int(round(v)) for v in centres[t].tolist())
            window = diff[t, max(0, y - 10):y + 11, max(0, x - 10):x + 11]
            assert window.max() > 0.25  # object edges change clearly


def test_generation_is_fast():
    make_clip(CFG, 0)
    t0 = time.perf_counter()
    for i in range(32):
        make_clip(CFG, i)
    assert time.perf_counter() - t0 < 1.5  # budget: 128 clips well under 2 s


def test_config_roundtrip_and_validation():
    cfg = SyntheticConfig(height=32, num_directions=8, seed=3)
    assert SyntheticConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="colour"):
        SyntheticConfig.from_dict({"height": 32, "colour": 1})
    bad = [
        ({"height": 8}, "height"),
        ({"width": 15}, "width"),
        ({"frames": 1}, "frames"),
        ({"num_shapes": 5}, "num_shapes"),
        ({"num_directions": 3}, "num_directions"),
        ({"noise": -0.1}, "noise"),
        ({"speed": 0}, "speed"),
        ({"camera_motion": -1}, "camera_motion"),
        ({"object_size": 0}, "object_size"),
        ({"object_size": 0.8}, "object_size"),
        ({"heatmap_stride": 0}, "heatmap_stride"),
        ({"heatmap_sigma": 0}, "heatmap_sigma"),
        ({"seed": -1}, "seed"),
        ({"height": "64"}, "height"),
        ({"noise": float("nan")}, "noise"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field) as info:
            SyntheticConfig(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="split"):
        make_clip(CFG, 0, "trian")


# ----------------------------------------------------------------------------- video IO


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return make_clip(SyntheticConfig(frames=12), 1)["clip"]  # (12, 3, 64, 64)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory, clip) -> str:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, clip, fps=25)
    return str(path)


def test_write_read_roundtrip(video_path, clip):
    assert sorted(os.listdir(os.path.dirname(video_path))) == ["clip.mp4"]  # no temp left
    frames = read_frames(video_path)
    assert frames.shape == clip.shape and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert (frames - clip).abs().mean() < 0.08


def test_read_options(video_path, clip):
    assert read_frames(video_path, max_frames=5).shape == (5, 3, 64, 64)
    part = read_frames(video_path, start=4, max_frames=3)
    full = read_frames(video_path)
    assert torch.equal(part, full[4:7])
    small = read_frames(video_path, max_frames=2, size=(32, 48))
    assert small.shape == (2, 3, 32, 48)
    with pytest.raises(VideoDecodeError, match="clip.mp4"):
        read_frames(video_path, start=100)
    with pytest.raises(ValueError):
        read_frames(video_path, max_frames=0)


def test_iter_frames_streams(video_path):
    it = iter_frames(video_path, size=(16, 16))
    first = next(it)
    assert first.shape == (3, 16, 16)
    assert sum(1 for _ in it) == 11
    it.close()


def test_video_info(video_path):
    info = video_info(video_path)
    assert info["height"] == 64 and info["width"] == 64
    assert math.isclose(info["fps"], 25.0)
    assert abs(info["frames"] - 12) <= 1


def test_write_rejects_odd_size_and_bad_shape(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", torch.rand(2, 3, 15, 16))
    with pytest.raises(ValueError):
        write_video(tmp_path / "bad.mp4", torch.rand(2, 16, 16))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["corrupt", "empty", "missing"])
def test_bad_files_raise_decode_error(tmp_path, kind):
    path = tmp_path / "x.mp4"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    for fn in (read_frames, iter_frames, video_info):
        with pytest.raises(VideoDecodeError) as info:
            fn(path)
        message = str(info.value)
        assert "x.mp4" in message and "\n" not in message


def test_no_video_stream(tmp_path):
    av = pytest.importorskip("av")
    if "aac" not in av.codecs_available:
        pytest.skip("no aac encoder")
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoDecodeError, match="no video stream"):
        read_frames(path)
