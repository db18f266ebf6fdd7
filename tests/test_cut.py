"""`gatesearch data cut`: long videos into a video folder a search reads (one clip per segment)."""

import torch
from click.testing import CliRunner

from gatesearch.cli import main
from gatesearch.data import read_frames, write_video
from gatesearch.data.cut import segment_size
from gatesearch.data.folder import FolderConfig, scan_folder


def test_cut_writes_consecutive_segments_per_class_and_refuses_to_overwrite(tmp_path):
    frames = torch.linspace(0, 1, 40).view(40, 1, 1, 1).expand(40, 3, 24, 40).contiguous()  # brightness ramp
    write_video(tmp_path / "street.mp4", frames, fps=10)
    write_video(tmp_path / "b.mp4", frames[:20], fps=10)
    runner = CliRunner()
    r = runner.invoke(main, ["data", "cut", str(tmp_path / "street.mp4"), str(tmp_path / "b.mp4"),
                             "--out", str(tmp_path / "vf"), "--class", "street", "--class", "park",
                             "--frames", "16", "--short-side", "16"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "vf" / "street").iterdir()) == ["street-0001.mp4", "street-0002.mp4"]
    assert [p.name for p in (tmp_path / "vf" / "park").iterdir()] == ["b-0001.mp4"]  # 20 frames: one segment
    second = read_frames(tmp_path / "vf" / "street" / "street-0002.mp4")
    assert second.shape == (16, 3, 16, 26)  # shorter side 16, aspect kept, even
    assert abs(float(second[0].mean()) - float(frames[16].mean())) < 0.03  # it starts at frame 16
    index = scan_folder(FolderConfig(root=str(tmp_path / "vf"), height=16, width=16))
    assert index.classes == ("park", "street") and len(index.train) + len(index.val) == 3

    again = runner.invoke(main, ["data", "cut", str(tmp_path / "b.mp4"), "--out", str(tmp_path / "vf"),
                                 "--class", "park", "--frames", "16"])
    assert again.exit_code != 0 and "b-0001.mp4: already exists" in again.output
    short = runner.invoke(main, ["data", "cut", str(tmp_path / "b.mp4"), "--out", str(tmp_path / "x"),
                                 "--frames", "16", "--every", "2"])
    assert short.exit_code != 0 and "shorter than one segment of 16 frames" in short.output


def test_segment_size_keeps_the_aspect_with_even_sides():
    assert segment_size(576, 768, 128) == (128, 170)
    assert segment_size(240, 320, 112) == (112, 150)
