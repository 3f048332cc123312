"""``data check`` / ``data synth`` through the argparse wiring: exit codes, JSON and messages."""

import argparse
import json

import pytest
from vvireid.training.data.check import check_dataset
from vvireid.training.data.cli import add_data_parser

TINY = ["--ids", "4", "--cameras", "2", "--frames", "12", "--size", "64x32"]


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="vvireid-train")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["hitsz-vcm", "bupt", "manifest"])
def test_synth_then_check_is_clean(tmp_path, capsys, fmt):
    code, out, _ = run(
        ["data", "synth", "--out", str(tmp_path / "d"), "--format", fmt, "--seed", "1", *TINY],
        capsys,
    )
    written = json.loads(out)
    assert (
        code == 0 and written["format"] == fmt and written["ids"] == 4 and written["seconds"] >= 0
    )
    code, out, err = run(["data", "check", "--format", fmt, str(tmp_path / "d"), "--deep"], capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] and err == ""
    assert report["decoded"] and report["frames_checked"] > 0
    train = report["summary"]["splits"]["train"]
    assert train["visible"]["ids"] == train["infrared"]["ids"] == 2
    assert report["summary"]["splits"]["ir_to_vis/query"]["infrared"]["tracklets"] > 0


def test_check_lists_every_problem_with_file_and_line(tmp_path, capsys):
    root = tmp_path / "vcm"
    run(["data", "synth", "--out", str(root), "--format", "hitsz-vcm", *TINY], capsys)
    frames = sorted((root / "Train" / "0001" / "rgb").rglob("*.jpg"))
    frames[0].unlink()
    frames[1].write_bytes(b"\xff\xd8 truncated")
    code, out, err = run(["data", "check", "--format", "hitsz-vcm", str(root)], capsys)
    report = json.loads(out)
    assert (
        code == 1 and report["num_problems"] == 1
    )  # the truncated file exists: found only by --deep
    (problem,) = report["problems"]
    assert f"{frames[0]} does not exist" in problem and "train_name.txt:" in problem
    line = int(problem.split("train_name.txt:")[1].split(":")[0])
    name = (root / "info" / "train_name.txt").read_text().splitlines()[line - 1]
    assert name.startswith(f"0001M2{frames[0].parent.name}T") and name.endswith(
        f"F{frames[0].name}"
    )
    assert err.startswith("error: ") and str(frames[0]) in err
    code, out, err = run(["data", "check", "--format", "hitsz-vcm", str(root), "--deep"], capsys)
    report = json.loads(out)
    assert code == 1 and report["num_problems"] == 2
    assert any(str(frames[1]) in p and "not a readable image" in p for p in report["problems"])


def test_check_reports_all_malformed_lines_and_still_checks_frames(tmp_path, capsys):
    root = tmp_path / "bupt"
    run(["data", "synth", "--out", str(root), "--format", "bupt", *TINY], capsys)
    with open(root / "query.txt", "a") as stream:
        stream.write("7 IR NOPE 1\n8 THERMAL LS3 1\n")
    code, out, err = run(
        ["data", "check", "--format", "bupt", str(root), "--max-problems", "1"], capsys
    )
    report = json.loads(out)
    assert code == 1 and report["num_problems"] == 2 and len(report["problems"]) == 1
    assert "query.txt:3: camera: unknown camera 'NOPE'" in err
    assert "... and 1 more" in err
    assert report["summary"] is not None and report["frames_checked"] > 0


def test_check_reports_a_bad_line_and_a_missing_frame_together(tmp_path, capsys):
    """A malformed track line must not hide the frame problems of the lines that did parse."""
    root = tmp_path / "vcm"
    run(["data", "synth", "--out", str(root), "--format", "hitsz-vcm", *TINY], capsys)
    info = root / "info" / "track_test_info.txt"
    lines = info.read_text().splitlines()
    lines[1] = "1 2 oops 4 5"
    info.write_text("\n".join(lines) + "\n")
    missing = sorted((root / "Train").rglob("*.jpg"))[0]
    missing.unlink()
    code, out, _ = run(["data", "check", "--format", "hitsz-vcm", str(root)], capsys)
    report = json.loads(out)
    assert code == 1 and report["num_problems"] == 2, report["problems"]
    bad_line, no_frame = sorted(report["problems"], key=lambda p: "does not exist" in p)
    assert bad_line.startswith(f"{info}:2: line: not all integers")
    assert f"{missing} does not exist" in no_frame and "train_name.txt:" in no_frame
    assert report["summary"]["splits"]["train"]["visible"]["tracklets"] > 0


def test_check_missing_dataset_and_bad_manifest(tmp_path, capsys):
    code, _, err = run(
        ["data", "check", "--format", "hitsz-vcm", str(tmp_path / "nowhere")], capsys
    )
    assert code == 1 and "train_name.txt: missing file" in err
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"tracklet_id": "a", "modality": "ir", "camid": 0, "frames": ["x.jpg"]}\n{oops\n'
    )
    code, out, err = run(["data", "check", "--format", "manifest", str(manifest)], capsys)
    assert code == 1 and f"{manifest}:2: json:" in err
    report = check_dataset("manifest", tmp_path / "m.jsonl")
    assert not report.ok and len(report.problems) == 1


def test_synth_rejects_bad_arguments(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    code, _, err = run(["data", "synth", "--out", str(tmp_path / "x"), "--format", "bupt"], capsys)
    assert code == 1 and "not empty" in err
    with pytest.raises(SystemExit):
        run(
            ["data", "synth", "--out", str(tmp_path / "y"), "--format", "bupt", "--size", "big"],
            capsys,
        )
