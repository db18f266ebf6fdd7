"""VideoFolder: the synthetic data written to disk and read back through PyAV."""

import json

import pytest
import torch
from click.testing import CliRunner

from gatesearch.cli import main
from gatesearch.data import SyntheticConfig, make_clip
from gatesearch.data.folder import DatasetError, FolderConfig, load_split, scan_folder, write_synthetic_folder
from gatesearch.data.video import VideoDecodeError
from gatesearch.spaces import SpaceError, parse_search_config

SMALL = SyntheticConfig(height=64, width=64, frames=8, num_shapes=2, num_directions=2, seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_folder(tmp_path_factory.mktemp("vf") / "data", SMALL, clips_per_class=3)


def test_layout_and_split(folder):
    index = scan_folder(FolderConfig(root=str(folder)))
    assert index.classes == ("disk-left", "disk-right", "square-left", "square-right")
    assert len(index.train) == 8 and len(index.val) == 4  # last of 3 per class held out
    assert all(item.annotations is not None for item in index.train)
    assert not index.skipped


def test_decoded_clip_matches_generator_and_annotations_follow_resize(folder):
    cfg = FolderConfig(root=str(folder), height=32, width=32, sampling="clip")
    val = load_split(cfg, "val", frames=8)
    assert val["clip"].shape == (4, 8, 3, 32, 32) and val["heatmap"].shape == (4, 8, 1, 8, 8)
    original = json.loads((folder / "disk-left" / "clip0002.json").read_text())["centers"]
    assert torch.allclose(val["centers"][0], (torch.tensor(original) + 0.5) * 0.5 - 0.5, atol=1e-4)
    full = load_split(FolderConfig(root=str(folder)), "val", frames=8)
    source = make_clip(SMALL, 1 + 2 * 4, "train")  # disk-left is label 1; clip k has index label + k*classes
    assert (full["clip"][0] - source["clip"]).abs().mean() < 0.03  # codec tolerance


def test_uniform_sampling_spreads_over_the_video(folder):
    cfg = FolderConfig(root=str(folder), sampling="uniform")
    clips = load_split(cfg, "train", frames=3, limit=1)
    centres = json.loads((folder / "disk-left" / "clip0000.json").read_text())["centers"]
    assert torch.allclose(clips["centers"][0], torch.tensor([centres[0], centres[4], centres[7]]), atol=1e-4)


def test_corrupt_video_is_reported_by_name_and_skipped(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    (root / "disk-left" / "broken.mp4").write_bytes(b"\x00\x01garbage" * 50)
    index = scan_folder(FolderConfig(root=str(root)))
    assert [p.endswith("broken.mp4") for p, _ in index.skipped] == [True]
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        scan_folder(FolderConfig(root=str(root), strict=True))
    skipped = []
    load_split(FolderConfig(root=str(root)), "train", frames=4, on_skip=lambda p, r: skipped.append(p))
    assert [p.rsplit("/", 1)[-1] for p in skipped] == ["broken.mp4"]  # sorted first, so in the training split


def test_split_file(folder, tmp_path):
    split = tmp_path / "val.txt"
    split.write_text("disk-left/clip0000.mp4\nsquare-right/clip0001.mp4\n")
    index = scan_folder(FolderConfig(root=str(folder), split_file=str(split)))
    assert sorted(i.path.name for i in index.val) == ["clip0000.mp4", "clip0001.mp4"] and len(index.train) == 10


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_folder(FolderConfig(root=str(tmp_path / "nope")))
    with pytest.raises(DatasetError, match="no class sub-folders"):
        scan_folder(FolderConfig(root=str(tmp_path)))
    with pytest.raises(ValueError, match="sampling"):
        FolderConfig(root="x", sampling="random")


def test_search_config_with_video_folder(folder, tmp_path):
    cfg = parse_search_config(
        {"data": {"kind": "video_folder", "folder": {"root": str(folder), "height": 32, "width": 32}}}
    )
    assert cfg.data.folder["root"] == str(folder.resolve())
    with pytest.raises(SpaceError, match="data.folder.root: .* is not a folder"):
        parse_search_config({"data": {"kind": "video_folder", "folder": {"root": str(tmp_path / "none")}}})
    with pytest.raises(SpaceError, match="data.folder: unknown key 'rot'"):
        parse_search_config({"data": {"kind": "video_folder", "folder": {"rot": "x"}}})
    with pytest.raises(SpaceError, match="data.synthetic: only used with kind: synthetic"):
        parse_search_config(
            {"data": {"kind": "video_folder", "folder": {"root": str(folder)}, "synthetic": {"height": 32}}}
        )
    with pytest.raises(SpaceError, match="data.kind: 'youtube' is not one of"):
        parse_search_config({"data": {"kind": "youtube"}})


def test_cli_data_synth(tmp_path):
    r = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "d"), "--clips-per-class", "1", "--frames", "4",
                                  "--shapes", "1", "--directions", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["disk-left", "disk-right"]
    r = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "d")])
    assert r.exit_code != 0 and "already exists" in r.output
