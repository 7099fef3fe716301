"""The robustness study: corrupted views of a data set, the study's cells and arithmetic, resume from saved cells
(in-process and after a real SIGKILL), every inference mode, one process = torchrun, and the command line."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_, run_cli, tiny_config

from segformer import SegformerForSemanticSegmentation
from segformer.corruptions import corrupt, corruption_rng
from segformer.data import build_dataset, write_synthetic_dataset
from segformer.evaluate import evaluate
from segformer.inference import InferenceOptions
from segformer.robustness import (
    HEATMAP_FILE,
    PARTIAL_FILE,
    RESULT_FILE,
    CorruptedDataset,
    RobustnessResult,
    plot_heatmap,
    run_study,
    study_severities,
)

PY = sys.executable


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=1, num_val=6, size=64, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model with random non-trivial weights: its predictions change with the input."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4)), seed=3).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return SegformerForSemanticSegmentation.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def val(data):
    return build_dataset(data, "val")[0]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_corrupted_dataset_is_the_corrupted_image_normalised_and_writes_nothing(data, val):
    before = _digest(data)
    view = CorruptedDataset(val, "gaussian_noise", 2, seed=5)
    assert len(view) == len(val) and view.num_labels == 4 and view.id2label == val.id2label
    for index in (0, 3):
        image, mask = val.read(index)
        expected = corrupt(image, "gaussian_noise", 2, rng=corruption_rng(index, "gaussian_noise", 2, seed=5))
        pixels, labels = view[index]
        reference, reference_labels = val.transform(expected, mask, np.random.default_rng(index))
        assert torch.equal(pixels, reference) and torch.equal(labels, reference_labels)
        assert torch.equal(labels, val[index][1]) and not torch.equal(pixels, val[index][0])
        assert torch.equal(view[index][0], pixels)  # deterministic
    assert not torch.equal(CorruptedDataset(val, "gaussian_noise", 2, seed=6)[0][0], view[0][0])
    assert _digest(data) == before, "the data on disk changed"


def test_study_severities():
    assert study_severities(["fog", "shot_noise"]) == {"fog": (1, 2, 3, 4, 5), "shot_noise": (1, 2, 3)}
    assert study_severities(["fog", "shot_noise"], [5, 1]) == {"fog": (1, 5), "shot_noise": (1, 5)}
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        study_severities(["rain"])
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
        study_severities(["fog"], [0])


def test_study_cells_are_evaluations_and_the_summary_adds_up(model, val, tmp_path, capsys):
    out = tmp_path / "study"
    result = run_study(
        model, val, corruptions=["motion_blur", "gaussian_noise"], severities=[1, 3], output=out, progress=True
    )
    assert result.corruptions == ["gaussian_noise", "motion_blur"]  # the study's order
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):  # before any pass, not after
        run_study(model, val, corruptions=["fog"], seed=-1)
    assert result.clean["mIoU"] == pytest.approx(evaluate(model, val)["mIoU"], abs=0)
    cell = evaluate(model, CorruptedDataset(val, "motion_blur", 3))
    assert result.miou("motion_blur", 3) == cell["mIoU"] and result.cells[("motion_blur", 3)]["aAcc"] == cell["aAcc"]
    values = {(n, s): result.miou(n, s) for n in result.corruptions for s in (1, 3)}
    assert len(set(values.values())) > 1, "every cell has the same mIoU: the corruptions changed nothing"
    noise_mean = (values[("gaussian_noise", 1)] + values[("gaussian_noise", 3)]) / 2
    assert result.mean("gaussian_noise") == pytest.approx(noise_mean)
    assert result.relative("gaussian_noise") == pytest.approx(noise_mean / result.clean_miou)
    overall = (result.mean("gaussian_noise") + result.mean("motion_blur")) / 2
    assert result.overall_mean == pytest.approx(overall)
    assert result.overall_relative == pytest.approx(overall / result.clean_miou)
    assert result.category_means() == {"noise": result.mean("gaussian_noise"), "blur": result.mean("motion_blur")}
    # the files: the result, the heat map, every cell saved
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["mIoU"]["motion_blur"]["3"] == cell["mIoU"] and saved["overall_relative"] == result.overall_relative
    assert saved["severities"] == {"gaussian_noise": [1, 3], "motion_blur": [1, 3]}
    with open(out / HEATMAP_FILE, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result.heatmap == out / HEATMAP_FILE
    cells = json.loads((out / PARTIAL_FILE).read_text())["cells"]
    assert set(cells) == {"clean", "gaussian_noise/1", "gaussian_noise/3", "motion_blur/1", "motion_blur/3"}
    # the table and the progress lines
    table = result.format_table()
    assert "gaussian_noise" in table and f"{100 * result.overall_mean:6.2f}" in table.splitlines()[-1]
    err = capsys.readouterr().err
    assert "robustness 5/5: motion_blur severity 3: mIoU" in err


def test_a_rerun_resumes_from_the_saved_cells(model, val, tmp_path, capsys):
    out = tmp_path / "study"
    kwargs = dict(corruptions=["contrast", "fog"], severities=[1, 2], output=out, progress=True)
    first = run_study(model, val, **kwargs)
    # drop two cells, as a run killed after its third cell would have left the file
    path = out / PARTIAL_FILE
    saved = json.loads(path.read_text())
    for key in ("fog/1", "fog/2"):
        del saved["cells"][key]
    path.write_text(json.dumps(saved))
    capsys.readouterr()
    second = run_study(model, val, **kwargs)
    err = capsys.readouterr().err
    assert "resuming, 3 of 5 cells" in err
    assert err.count("(saved)") == 3 and "fog severity 1: mIoU" in err and "fog severity 2: mIoU" in err
    assert "fog severity 1: mIoU" not in [line for line in err.splitlines() if line.endswith("(saved)")]
    assert second.to_dict() == first.to_dict()
    assert set(json.loads(path.read_text())["cells"]) == {"clean", "contrast/1", "contrast/2", "fog/1", "fog/2"}


def test_a_folder_of_another_study_is_refused(model, val, tmp_path):
    out = tmp_path / "study"
    run_study(model, val, corruptions=["contrast"], severities=[1], output=out)
    other = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4)), seed=9).eval()
    with pytest.raises(
        ValueError, match=r"made with another model \(other weights or backend\); use another output folder"
    ):
        run_study(other, val, corruptions=["contrast"], severities=[1], output=out)
    with pytest.raises(ValueError, match="another inference options"):
        run_study(model, val, InferenceOptions(flip=True), corruptions=["contrast"], severities=[1], output=out)
    with pytest.raises(ValueError, match="another corruption seed"):
        run_study(model, val, corruptions=["contrast"], severities=[1], output=out, seed=1)
    with pytest.raises(ValueError, match="another data"):
        run_study(model, val, corruptions=["contrast"], severities=[1], output=out, max_images=3)
    # other corruptions with the same model, data and options extend the same study
    more = run_study(model, val, corruptions=["contrast", "fog"], severities=[1], output=out)
    assert more.miou("fog", 1) is not None
    (out / PARTIAL_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable robustness study"):
        run_study(model, val, corruptions=["contrast"], severities=[1], output=out)


@pytest.mark.parametrize(
    "options",
    [
        InferenceOptions(mode="whole"),
        InferenceOptions(mode="aligned", short_side=48, long_side=96),
        InferenceOptions(mode="slide", crop_size=(48, 48), stride=(32, 32)),
        InferenceOptions(mode="whole", scales=(0.75, 1.25), flip=True),
    ],
    ids=["whole", "aligned", "slide", "multiscale-flip"],
)
def test_every_inference_mode(model, val, options):
    result = run_study(model, val, options, corruptions=["snow"], severities=[2], max_images=3)
    expected = evaluate(model, CorruptedDataset(val, "snow", 2), options, max_images=3)
    assert result.miou("snow", 2) == expected["mIoU"] and result.num_images == 3
    assert result.clean["mIoU"] == evaluate(model, val, options, max_images=3)["mIoU"]
    assert result.options == options.to_dict()


def test_result_round_trips_missing_values():
    result = RobustnessResult(
        clean={"mIoU": 0.5}, cells={("fog", 1): {"mIoU": None}}, severities={"fog": (1,)}, num_images=1
    )
    assert result.mean("fog") is None and result.relative("fog") is None and result.overall_relative is None
    assert "     -" in result.format_table()
    json.dumps(result.to_dict())


def test_a_mean_over_a_missing_cell_is_missing_not_a_mean_of_fewer_cells(tmp_path):
    """fog severity 2 not evaluated, snow severity 3 undefined (NaN): their means, the weather mean and the overall
    mean are missing (None, "-" in the table, null in the JSON, a blank cell in the heat map), never the mean of
    the cells that are there; the table and the JSON name the missing cells. A complete corruption keeps its mean."""
    noise = {("gaussian_noise", s): {"mIoU": 0.5 - 0.1 * s} for s in (1, 2, 3)}
    cells = {**noise, ("fog", 1): {"mIoU": 0.6}, ("fog", 3): {"mIoU": 0.2}}  # ("fog", 2): not evaluated
    cells |= {("snow", 1): {"mIoU": 0.4}, ("snow", 2): {"mIoU": 0.4}, ("snow", 3): {"mIoU": float("nan")}}
    severities = {"gaussian_noise": (1, 2, 3), "fog": (1, 2, 3), "snow": (1, 2, 3)}
    result = RobustnessResult(clean={"mIoU": 0.8}, cells=cells, severities=severities, num_images=2)
    assert result.mean("gaussian_noise") == pytest.approx(0.3)
    assert result.relative("gaussian_noise") == pytest.approx(0.3 / 0.8)
    assert result.mean("fog") is None and result.relative("fog") is None and result.mean("snow") is None
    assert result.category_means() == {"noise": pytest.approx(0.3), "weather": None}
    assert result.overall_mean is None and result.overall_relative is None
    saved = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert saved["mean"] == {"gaussian_noise": pytest.approx(0.3), "fog": None, "snow": None}
    assert saved["overall_mean"] is None and saved["categories"]["weather"] == {"mean": None, "relative": None}
    assert saved["mIoU"]["fog"]["2"] is None and saved["mIoU"]["snow"]["3"] is None
    assert result.missing_cells() == [("fog", 2), ("snow", 3)] and saved["missing"] == ["fog/2", "snow/3"]
    table = result.format_table().splitlines()
    fog = next(line for line in table if line.startswith("fog"))
    assert fog.split()[1:] == ["60.00", "-", "20.00", "-", "-"]  # s1 s2 s3, mean, relative
    weather = next(line for line in table if line.startswith("mean (weather)"))
    overall = next(line for line in table if line.startswith("mean ") and "(" not in line)
    assert weather.split()[-2:] == ["-", "-"] and overall.split()[-2:] == ["-", "-"]
    assert table[-1].startswith("missing: fog s2, snow s3")
    complete = RobustnessResult(clean={"mIoU": 0.8}, cells=noise, severities={"gaussian_noise": (1, 2, 3)})
    assert complete.missing_cells() == [] and complete.overall_mean == pytest.approx(0.3)
    assert "missing" not in complete.format_table() and complete.to_dict()["missing"] == []
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot_heatmap(result, tmp_path / "map.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ command line
def test_cli_study_prints_the_table_and_writes_json(data, model_dir, tmp_path, capsys):
    out = tmp_path / "robust"
    code, stdout, err = run_cli(capsys, "eval", "--data", data, "--model", model_dir, "--device", "cpu",
                                "--workers", "0", "--corruptions", "contrast,impulse_noise", "--severities", "2",
                                "--output", out, "--json", tmp_path / "m.json")  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["mIoU"] == saved["robustness"]["clean_mIoU"]  # the clean metrics, plus the study
    assert set(saved["robustness"]["mIoU"]) == {"impulse_noise", "contrast"}
    assert "relative" in stdout and "impulse_noise" in stdout and "mIoU" in stdout
    assert (out / HEATMAP_FILE).stat().st_size > 0 and (out / RESULT_FILE).is_file()


def test_cli_study_without_matplotlib_says_so_and_leaves_no_stale_heat_map(data, model_dir, tmp_path, capsys,
                                                                            monkeypatch):  # fmt: skip
    """Without matplotlib the study still writes its JSON; the line naming the outputs says there is no heat map
    and how to get one, and an earlier run's heat map in the folder (older cells) is not left beside the new JSON."""
    out = tmp_path / "robust"
    out.mkdir()
    (out / HEATMAP_FILE).write_bytes(b"\x89PNG\r\n\x1a\n an earlier run's map")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = run_cli(capsys, "eval", "--data", data, "--model", model_dir, "--device", "cpu", "--workers", "0",
                           "--corruptions", "contrast", "--severities", "1", "--output", out)  # fmt: skip
    assert code == 0, err
    assert f'wrote {out / RESULT_FILE} (no heat map: pip install "segformer[plot]")' in err
    assert (out / RESULT_FILE).is_file() and not (out / HEATMAP_FILE).exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--corruptions", "rain"], "--corruptions: unknown corruption 'rain'"),
        (["--corruptions", "fog", "--severities", "2,9"], "--severities must be integers from 1 to 5"),
        (["--severities", "2"], "--severities belongs to the robustness study: add --corruptions"),
        (["--output", "x"], "--output belongs to the robustness study: add --corruptions"),
        (["--worst", "-1"], "expected an integer >= 0"),
        (
            ["--corruptions", "fog", "--seed", "-1"],
            "--seed: expected an integer >= 0",
        ),  # (numpy's, after the clean pass)
    ],
)
def test_cli_bad_study_arguments_are_one_line(argv, message, data, model_dir, capsys):
    code, _, err = run_cli(capsys, "eval", "--data", data, "--model", model_dir, *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0 or err.startswith("usage:")


# ------------------------------------------------------------------------------------- real processes
def _eval_args(data: Path, model_dir: Path, *extra: object) -> list[str]:
    return ["-m", "segformer", "eval", "--data", str(data), "--model", str(model_dir), "--device", "cpu",
            *map(str, extra)]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_one_process_and_torchrun_give_identical_studies_and_reports(data, model_dir, tmp_path):
    study = ["--corruptions", "gaussian_noise,motion_blur", "--severities", "1,2", "--worst", "3"]
    one = subprocess.run([PY, *_eval_args(data, model_dir, *study, "--workers", "1", "--report", tmp_path / "one")],
                         capture_output=True, text=True, env=ENV, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *_eval_args(data, model_dir, *study, "--workers", "0", "--report", tmp_path / "two")],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / RESULT_FILE).read_text())
    b = json.loads((tmp_path / "two" / RESULT_FILE).read_text())
    assert a == b  # every cell's metrics, means and relative robustness, exactly
    assert len(a["cells"]) == 5 and a["num_images"] == 6
    ra = json.loads((tmp_path / "one" / "metrics.json").read_text())
    rb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert ra == rb and ra["robustness"] == a
    html_a = (tmp_path / "one" / "report.html").read_text()
    assert html_a == (tmp_path / "two" / "report.html").read_text()  # the same worst images, in the same order
    for name in ("worst_01.png", "worst_03.png", "confusion_matrix.png", "robustness.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert one.stdout.count("robustness: mIoU") == 1 and two.stdout.count("robustness: mIoU") == 1  # rank 0 only


@pytest.mark.slow
def test_a_study_killed_after_its_first_corruption_resumes_to_the_same_table(model_dir, model, tmp_path):
    """SIGKILL the real process as soon as it reports the first corruption done (the study runs noise before
    blur) and its saved cells show it; the rerun skips the finished cells and ends with the table of an
    uninterrupted study."""
    data = write_synthetic_dataset(tmp_path / "data", num_train=1, num_val=60, size=64, seed=1)
    out = tmp_path / "study"
    args = _eval_args(data, model_dir, "--corruptions", "glass_blur,impulse_noise", "--severities", "1,2",
                      "--output", out, "--workers", "0")  # fmt: skip
    partial = out / PARTIAL_FILE
    proc = subprocess.Popen([PY, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    try:
        # the progress line of a cell follows the save of that cell: block on it instead of polling the file
        for line in proc.stderr:
            lines.append(line)
            if "impulse_noise severity 2: mIoU" in line:
                assert "impulse_noise/2" in json.loads(partial.read_text())["cells"]  # saved atomically: always whole
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-2000:]
    cells = json.loads(partial.read_text())["cells"]
    assert {"clean", "impulse_noise/1", "impulse_noise/2"} <= set(cells) and "glass_blur/2" not in cells, sorted(cells)
    assert not (out / RESULT_FILE).exists()

    resumed = subprocess.run([PY, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming, {len(cells)} of 5 cells" in resumed.stderr
    done = {line.split(": ")[1] for line in resumed.stderr.splitlines() if line.endswith("(saved)")}
    assert {"impulse_noise severity 2", "clean"} <= done and "glass_blur severity 2" not in done
    assert "glass_blur severity 2: mIoU" in resumed.stderr
    # the uninterrupted study, in this process
    val = build_dataset(data, "val")[0]
    straight = run_study(model, val, corruptions=["glass_blur", "impulse_noise"], severities=[1, 2])
    assert straight.format_table() in resumed.stdout
    assert json.loads((out / RESULT_FILE).read_text())["cells"] == straight.to_dict()["cells"]


@pytest.mark.slow
def test_without_scipy_a_study_that_needs_it_stops_before_its_first_pass(data, model_dir, tmp_path):
    """In a process where scipy cannot be imported: the corruptions that fail are exactly NEEDS_SCIPY, each with
    the install command; `eval --corruptions all` is refused before the clean pass, in one line naming them, and a
    study of the others runs."""
    script = f"""
import sys
sys.modules["scipy"] = None  # as if it were not installed
import numpy as np
from segformer.cli import main
from segformer.corruptions import CORRUPTION_NAMES, NEEDS_SCIPY, SEVERITIES, corrupt

image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
failing = set()
for name in CORRUPTION_NAMES:
    for severity in SEVERITIES:
        try:
            corrupt(image, name, severity)
        except RuntimeError as exc:
            assert 'need scipy: pip install "segformer[robustness]"' in str(exc) or "needs scipy" in str(exc), exc
            failing.add(name)
assert failing == NEEDS_SCIPY, sorted(failing ^ NEEDS_SCIPY)
args = ["eval", "--data", {str(data)!r}, "--model", {str(model_dir)!r}, "--device", "cpu", "--workers", "0"]
assert main([*args, "--corruptions", "all", "--output", {str(tmp_path / "all")!r}]) == 2
print("---", file=sys.stderr)
sys.exit(main([*args, "--corruptions", "fog,contrast", "--severities", "1", "--output", {str(tmp_path / "some")!r}]))
"""
    proc = subprocess.run([PY, "-c", script], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, ran = proc.stderr.split("---\n")
    needing = "defocus_blur, glass_blur, gaussian_blur, snow, spatter, frost"
    assert (
        refused == f'segformer eval: error: the corruptions {needing} need scipy: pip install "segformer[robustness]"\n'
    )
    assert not (tmp_path / "all").exists()  # nothing evaluated, nothing written
    assert (tmp_path / "some" / RESULT_FILE).is_file() and "fog" in proc.stdout
