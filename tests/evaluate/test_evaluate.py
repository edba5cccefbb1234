"""`edgederm evaluate`: numbers against scikit-learn, intervals, subgroups, resume, report.

The bundle here is a hand-built ONNX classifier on 64 x 64 images of flat skin with a
coloured lesion square in the centre: it classifies the lesion's mean colour by nearest
prototype, and adds a large melanoma logit when the skin at the top border is dark.
So it is accurate on light skin and calls nearly everything melanoma on Fitzpatrick
VI-like skin: a model made worse on one skin tone on purpose.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgederm.evaluate import EvaluateOptions, evaluate, write_report
from edgederm.evaluate.skin import ITA_CATEGORIES, individual_typology_angle, ita_category
from edgederm.evaluate.stats import Cases, bootstrap, point_metrics
from edgederm.runtime import load

from tests import layout_fixtures
from tests.flat_lesions import (
    CLASSES,
    SIZE,
    SKIN_RGB,
    dark_pixel_segmenter,
    lesion_colour_classifier,
    mean_colour_classifier,
    write_flat_dataset,
)


@pytest.fixture(scope="module")
def darkness_bundle(tmp_path_factory, write_onnx_bundle):
    """fp32 graph, and an "fp16" graph: the same weights rounded to float16 (a reduced-precision copy)."""
    root = tmp_path_factory.mktemp("evaluate") / "bundle"
    return write_onnx_bundle(root, {"fp32": lesion_colour_classifier(), "fp16": lesion_colour_classifier(np.float16)},
                             CLASSES, SIZE, {"temperature": 1.5, "review_threshold": 0.6, "review_classes": ["vascular"],
                                             "malignant_classes": ["melanoma"], "malignant_threshold": 0.3})


@pytest.fixture(scope="module")
def flat_data(tmp_path_factory):
    return write_flat_dataset(tmp_path_factory.mktemp("evaluate") / "data", per_cell=6, seed=1)


@pytest.fixture(scope="module")
def evaluation(darkness_bundle, flat_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate") / "report"
    result = evaluate(darkness_bundle, flat_data, folder, EvaluateOptions(by=["skin_tone", "sex", "age"], n_boot=300))
    return result, folder


def _ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE written independently: bin index by np.digitize on right-closed bins."""
    confidence = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    index = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1), right=True) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.sum() / len(labels) * abs(correct[sel].mean() - confidence[sel].mean())
    return total


def test_metrics_match_scikit_learn_on_runtime_predictions(evaluation, darkness_bundle, flat_data):
    """Every number evaluate reports against scikit-learn on the runtime's own probabilities."""
    metrics_sk = pytest.importorskip("sklearn.metrics")
    from edgederm.data import read_dataset

    result, _ = evaluation
    model = load(darkness_bundle, precision="fp32")
    dataset = read_dataset(flat_data, classes=CLASSES)
    probs = np.array([[model.predict_file(r.image).probabilities[c] for c in CLASSES] for r in dataset])
    y = dataset.labels
    pred = probs.argmax(1)
    got = result["precisions"]["fp32"]["metrics"]
    recall = metrics_sk.recall_score(y, pred, average=None, labels=[0, 1, 2])
    ppv = metrics_sk.precision_score(y, pred, average=None, labels=[0, 1, 2], zero_division=np.nan)
    f1 = metrics_sk.f1_score(y, pred, average=None, labels=[0, 1, 2])
    cm = metrics_sk.confusion_matrix(y, pred, labels=[0, 1, 2])
    assert result["precisions"]["fp32"]["confusion_matrix"] == cm.tolist()
    for c, name in enumerate(CLASSES):
        assert got[f"sensitivity[{name}]"]["value"] == pytest.approx(recall[c], abs=1e-9)
        specificity = metrics_sk.recall_score(y != c, pred != c)
        assert got[f"specificity[{name}]"]["value"] == pytest.approx(specificity, abs=1e-9)
        if not math.isnan(ppv[c]):
            assert got[f"ppv[{name}]"]["value"] == pytest.approx(ppv[c], abs=1e-9)
        npv = metrics_sk.precision_score(y != c, pred != c)
        assert got[f"npv[{name}]"]["value"] == pytest.approx(npv, abs=1e-9)
        assert got[f"f1[{name}]"]["value"] == pytest.approx(f1[c], abs=1e-9)
        assert got[f"auroc[{name}]"]["value"] == pytest.approx(metrics_sk.roc_auc_score(y == c, probs[:, c]), abs=1e-9)
    assert got["auroc"]["value"] == pytest.approx(metrics_sk.roc_auc_score(y, probs, multi_class="ovr"), abs=1e-9)
    assert got["balanced_accuracy"]["value"] == pytest.approx(metrics_sk.balanced_accuracy_score(y, pred), abs=1e-9)
    assert got["accuracy"]["value"] == pytest.approx(metrics_sk.accuracy_score(y, pred), abs=1e-9)
    brier = sum(metrics_sk.brier_score_loss(y == c, probs[:, c]) for c in range(3))
    assert got["brier"]["value"] == pytest.approx(brier, abs=1e-9)
    assert got["ece"]["value"] == pytest.approx(_ece_reference(probs, y), abs=1e-9)
    # The device's malignant call: melanoma on top, or referred as possible malignancy.
    p_mal = probs[:, 1]
    flagged = (pred == 1) | (p_mal >= 0.3)
    assert got["malignant_sensitivity"]["value"] == pytest.approx(metrics_sk.recall_score(y == 1, flagged), abs=1e-9)
    # Each interval holds its point estimate's neighbourhood: lo <= hi, both in [0, 1].
    for name in ("accuracy", "auroc", "sensitivity[melanoma]", "ece"):
        lo, hi = got[name]["ci"]
        assert 0.0 <= lo <= hi <= 1.0


@pytest.mark.parametrize("builder", ["make_isic2019", "make_isic2018", "make_ham10000", "make_pad", "make_derm7pt",
                                     "make_ph2", "make_folder", "make_clinic_csv"])
def test_every_public_layout_gives_the_scikit_learn_numbers(builder, tmp_path, write_onnx_bundle):
    """The tiny fixture of each labelled layout, through evaluate, against scikit-learn."""
    metrics_sk = pytest.importorskip("sklearn.metrics")
    from edgederm.data import read_dataset

    root = getattr(layout_fixtures, builder)(tmp_path / "data")
    dataset = read_dataset(root)
    names = list(dataset.class_names)
    bundle = write_onnx_bundle(tmp_path / "bundle", {"fp32": mean_colour_classifier(len(names))}, names, 32,
                               {"temperature": 1.0, "review_threshold": 0.5})
    result = evaluate(bundle, root, tmp_path / "report", EvaluateOptions(n_boot=0))
    got = result["precisions"]["fp32"]
    assert got["evaluated"] == len(dataset) and result["data"]["layout"] == dataset.layout
    model = load(bundle, precision="fp32")
    probs = np.array([[model.predict_file(r.image).probabilities[c] for c in names] for r in dataset])
    y, pred = dataset.labels, probs.argmax(1)
    assert got["confusion_matrix"] == metrics_sk.confusion_matrix(y, pred, labels=list(range(len(names)))).tolist()
    for c, name in enumerate(names):
        if (y == c).any():
            assert got["metrics"][f"sensitivity[{name}]"]["value"] == pytest.approx(
                metrics_sk.recall_score(y == c, pred == c), abs=1e-9)
        if 0 < (y == c).sum() < len(y):
            assert got["metrics"][f"auroc[{name}]"]["value"] == pytest.approx(
                metrics_sk.roc_auc_score(y == c, probs[:, c]), abs=1e-9)
        else:
            assert got["metrics"][f"auroc[{name}]"]["value"] is None
    assert got["metrics"]["accuracy"]["value"] == pytest.approx(metrics_sk.accuracy_score(y, pred), abs=1e-9)
    assert got["metrics"]["ece"]["value"] == pytest.approx(_ece_reference(probs, y), abs=1e-9)


def test_precisions_side_by_side_with_change_against_fp32(evaluation):
    result, _ = evaluation
    table = result["comparison"]
    assert table["reference"] == "fp32"
    for metric, per in table["metrics"].items():
        assert per["fp32"]["change"] in (0.0, None)
        fp16 = per["fp16"]
        if fp16["value"] is not None and per["fp32"]["value"] is not None:
            assert fp16["change"] == pytest.approx(fp16["value"] - per["fp32"]["value"], abs=1e-12)


def test_gap_flagged_for_the_skin_tone_the_model_fails_on(evaluation):
    result, folder = evaluation
    sub = result["precisions"]["fp32"]["subgroups"]["skin_tone"]
    assert result["precisions"]["fp32"]["skin_tone_sources"] == {"metadata": len(SKIN_RGB) * 3 * 6}
    assert sub["flagged"]
    gap = sub["gaps"][sub["largest_gap"]]
    assert gap["worst"] == "Fitzpatrick VI" and gap["flagged"]
    assert sub["gaps"]["accuracy"]["flagged"] and sub["gaps"]["accuracy"]["worst"] == "Fitzpatrick VI"
    # The page leads with the flagged gap and states the skin-tone method.
    page = write_report(result, folder)
    text = page.read_text()
    assert "Largest gap, flagged" in text and "Fitzpatrick VI" in text
    assert "individual typology angle" in text


def test_skin_tone_from_ita_when_the_metadata_has_none(darkness_bundle, tmp_path):
    data = write_flat_dataset(tmp_path / "data", per_cell=4, seed=2, skin_tone_column=False)
    result = evaluate(darkness_bundle, data, tmp_path / "report",
                      EvaluateOptions(precisions=["fp32"], by=["skin_tone"], n_boot=200))
    summary = result["precisions"]["fp32"]
    assert set(summary["skin_tone_sources"]) == {"ita"}
    sub = summary["subgroups"]["skin_tone"]
    assert sub["flagged"] and sub["gaps"][sub["largest_gap"]]["worst"] == "ITA dark"
    assert "ITA very light" in sub["groups"]


def _lab_reference(rgb):
    """CIE L*a*b* (D65) of an sRGB colour, from the published formulas."""
    c = np.asarray(rgb, np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


@pytest.mark.parametrize("skin", SKIN_RGB)
def test_ita_of_flat_skin_matches_the_formula(skin):
    image = np.empty((96, 96, 3), np.uint8)
    image[:] = skin
    image[36:60, 36:60] = (40, 20, 20)  # a dark lesion in the middle is not skin
    l_star, _, b_star = _lab_reference(skin)
    expected = math.degrees(math.atan((l_star - 50) / b_star))
    assert individual_typology_angle(image) == pytest.approx(expected, abs=0.5)
    mask = np.zeros((96, 96), np.uint8)
    mask[36:60, 36:60] = 1
    assert individual_typology_angle(image, mask) == pytest.approx(expected, abs=0.5)


def test_ita_categories_follow_the_published_bounds():
    assert [ita_category(a) for a in (60, 50, 30, 20, 0, -40)] == [
        "very light", "light", "intermediate", "tan", "brown", "dark"]
    assert [b for b, _ in ITA_CATEGORIES[:-1]] == [55, 41, 28, 10, -30]


def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate():
    """200 simulated datasets of 150 malignant cases with true sensitivity 0.8.

    Coverage of a correct 95% interval is Binomial(200, ~0.95)/200: sd 0.015. The
    percentile bootstrap of a proportion at n = 150 undercovers slightly (about 0.94),
    so [0.88, 0.99] is more than 3.5 sd below and about 2.5 sd above the expected rate
    (P(200 of 200) at 0.95 is 4e-5): a change that broke the intervals fails it, the
    seed cannot.
    """
    rng = np.random.default_rng(12)
    truth, covered = 0.8, 0
    for i in range(200):
        hits = rng.random(150) < truth
        lo, hi = bootstrap(lambda idx: {"s": float(hits[idx].mean())}, len(hits), 400, seed=i)["s"]
        covered += lo <= truth <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_point_metrics_of_absent_classes_are_undefined_not_zero():
    cases = Cases(CLASSES, np.array([0, 0, 1]), np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]]),
                  np.array([0, 1, 1]), np.zeros(3, bool), [[], [], []], ["melanoma"], np.array([False, True, True]))
    m = point_metrics(cases)
    assert math.isnan(m["sensitivity[vascular]"]) and math.isnan(m["auroc[vascular]"])
    assert m["sensitivity[nevus]"] == 0.5 and m["balanced_accuracy"] == 0.75


def test_segmentation_figures_match_scikit_learn(tmp_path):
    """Per-image Dice and IoU of evaluate_case (a segmenter's Result.mask vs the mask file)."""
    metrics_sk = pytest.importorskip("sklearn.metrics")
    from edgederm.data import Record
    from edgederm.evaluate.case import evaluate_case
    from edgederm.evaluate.stats import segmentation_summary
    from edgederm.runtime import Result

    rng = np.random.default_rng(3)
    rows, dice_ref, iou_ref = [], [], []
    for i in range(6):
        truth = np.zeros((80, 90), np.uint8)
        cv2.circle(truth, (int(rng.integers(30, 60)), int(rng.integers(30, 50))), int(rng.integers(10, 25)), 1, -1)
        pred = np.roll(truth, int(rng.choice([-6, -3, -1, 2, 5])), axis=1) * 255  # never 0: HD95 > 0
        cv2.imwrite(str(tmp_path / f"m{i}.png"), truth * 255)
        cv2.imwrite(str(tmp_path / f"i{i}.png"), np.zeros((80, 90, 3), np.uint8))

        class Segmenter:
            modalities = ["dermoscopy"]

            def predict_file(self, path, metadata=None, clinical=None, mask=pred):
                return Result(None, {}, False, [], "onnxruntime", "fp32", mask=mask)

        record = Record(f"c{i}", tmp_path / f"i{i}.png", None, (), {}, mask=tmp_path / f"m{i}.png")
        rows.append(evaluate_case(Segmenter(), record)["segmentation"])
        dice_ref.append(metrics_sk.f1_score(truth.ravel() > 0, pred.ravel() > 0))
        iou_ref.append(metrics_sk.jaccard_score(truth.ravel() > 0, pred.ravel() > 0))
    for row, d, j in zip(rows, dice_ref, iou_ref):
        assert row["dice"] == pytest.approx(d, abs=1e-6)
        assert row["iou"] == pytest.approx(j, abs=1e-6)
        assert row["hd95"] > 0
    summary = segmentation_summary(rows, 200, 0)
    assert summary["dice"]["value"] == pytest.approx(np.mean(dice_ref), abs=1e-6)
    assert summary["dice"]["ci"][0] <= summary["dice"]["value"] <= summary["dice"]["ci"][1]


def test_segmenter_tiled_dice_iou_match_scikit_learn(tmp_path, write_onnx_bundle):
    """A segmenter bundle run tiled by the runtime (images larger than a tile) on the
    isic_segmentation layout: per-image Dice and IoU against scikit-learn on the masks
    the runtime returned."""
    metrics_sk = pytest.importorskip("sklearn.metrics")

    rng = np.random.default_rng(7)
    images, masks = tmp_path / "data" / "ISIC2018_Task1-2_Training_Input", tmp_path / "data" / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(5):
        image = np.full((110, 150, 3), SKIN_RGB[1], np.uint8)
        truth = np.zeros((110, 150), np.uint8)
        cv2.ellipse(truth, (int(rng.integers(50, 100)), int(rng.integers(40, 70))),
                    (int(rng.integers(15, 35)), int(rng.integers(10, 30))), 0, 0, 360, 1, -1)
        image[truth > 0] = (70, 45, 40)
        image[:, :int(rng.integers(0, 20))] = (90, 90, 90)  # a dark band that is not lesion: imperfect masks
        cv2.imwrite(str(images / f"ISIC_{i:07d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
        cv2.imwrite(str(masks / f"ISIC_{i:07d}_segmentation.png"), truth * 255)
    bundle = write_onnx_bundle(tmp_path / "bundle", {"fp32": dark_pixel_segmenter()}, ["background", "lesion"], 64,
                               {}, task="segment", tiling={"tile": 64, "overlap": 0.25, "blend": "gaussian"})
    result = evaluate(bundle, tmp_path / "data", tmp_path / "report", EvaluateOptions(n_boot=100))
    assert result["data"]["layout"] == "isic_segmentation"
    model = load(bundle, precision="fp32")
    assert model.plan_memory(110, 150).batch_size >= 1
    dice_ref, iou_ref = [], []
    for i in range(5):
        predicted = model.predict_file(images / f"ISIC_{i:07d}.jpg").mask > 0
        truth = cv2.imread(str(masks / f"ISIC_{i:07d}_segmentation.png"), cv2.IMREAD_GRAYSCALE) > 127
        assert model.last_run["tiles"] > 1  # tiled, not one resized pass
        dice_ref.append(metrics_sk.f1_score(truth.ravel(), predicted.ravel()))
        iou_ref.append(metrics_sk.jaccard_score(truth.ravel(), predicted.ravel()))
    seg = result["precisions"]["fp32"]["segmentation"]
    assert 0.0 < np.mean(dice_ref) < 1.0  # the band makes the masks imperfect: a number that can be wrong
    assert seg["dice"]["value"] == pytest.approx(np.mean(dice_ref), abs=1e-6)
    assert seg["iou"]["value"] == pytest.approx(np.mean(iou_ref), abs=1e-6)
    assert seg["dice"]["ci"][0] <= seg["dice"]["value"] <= seg["dice"]["ci"][1]
    page = write_report(result, tmp_path / "report")
    assert "Segmentation (mean per image" in page.read_text()


def test_resume_runs_only_the_cases_left(darkness_bundle, flat_data, tmp_path):
    class Stop(Exception):
        pass

    seen = []

    def stop_after_five(what, done, total):
        seen.append(done)
        if done == 5:
            raise Stop

    options = EvaluateOptions(precisions=["fp32"], n_boot=50, progress=stop_after_five)
    with pytest.raises(Stop):
        evaluate(darkness_bundle, flat_data, tmp_path, options)
    cases = tmp_path / "cases" / "fp32.jsonl"
    assert len(cases.read_text().splitlines()) == 1 + 5
    with open(cases, "ab") as f:  # a line torn by a kill
        f.write(b'{"id":"t1_nevus_5","lab')
    seen.clear()
    resumed = evaluate(darkness_bundle, flat_data, tmp_path, options)
    assert seen[0] == 6 and seen[-1] == len(SKIN_RGB) * 3 * 6
    fresh = evaluate(darkness_bundle, flat_data, tmp_path / "fresh", EvaluateOptions(precisions=["fp32"], n_boot=50))
    assert resumed["precisions"] == fresh["precisions"]


def test_resume_refuses_results_of_another_bundle(darkness_bundle, mini_bundle, flat_data, tmp_path):
    from edgederm.runtime.errors import InputError

    evaluate(darkness_bundle, flat_data, tmp_path, EvaluateOptions(precisions=["fp32"], n_boot=0, limit=3))
    shutil.copy(tmp_path / "cases" / "fp32.jsonl", tmp_path / "kept.jsonl")
    with pytest.raises(InputError, match="results of another evaluation"):
        evaluate(mini_bundle, flat_data, tmp_path, EvaluateOptions(precisions=["fp32"], n_boot=0, limit=3))


@pytest.mark.slow
def test_workers_give_the_same_numbers(darkness_bundle, flat_data, tmp_path):
    one = evaluate(darkness_bundle, flat_data, tmp_path / "one", EvaluateOptions(precisions=["fp32"], n_boot=50))
    two = evaluate(darkness_bundle, flat_data, tmp_path / "two", EvaluateOptions(precisions=["fp32"], n_boot=50, workers=2))
    assert one["precisions"] == two["precisions"]


def test_cli_evaluate_prints_the_table_and_writes_the_report(darkness_bundle, flat_data, tmp_path, capsys):
    from edgederm.cli import main

    code = main(["evaluate", str(darkness_bundle), str(flat_data), "--by", "skin_tone", "--report", str(tmp_path),
                 "--bootstrap", "100", "--malignant", "melanoma"])
    out = capsys.readouterr().out
    assert code == 0
    assert "malignant_sensitivity" in out and "skin_tone" in out and "FLAGGED" in out
    for name in ("report.html", "evaluation.json", "reliability.png", "coverage_risk.png", "roc_fp32.png",
                 "confusion_fp32.png", "forest_skin_tone.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert main(["evaluate", str(darkness_bundle), str(flat_data), "--precision", "int8", "--report",
                 str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _render(page: Path, screenshot: Path) -> str:
    """Headless Chromium: screenshot ``page``; stderr with the console log."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr",
             "--v=0", "--window-size=1200,2400", f"--screenshot={screenshot}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                             "the report page is not rendered in a browser here")
def test_report_renders_in_headless_chromium_without_console_errors(evaluation, tmp_path, record_property):
    result, folder = evaluation
    page = write_report(result, folder)
    # The console check itself catches an error (a page that throws), so a clean run means something.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>throw new Error('deliberate')</script></body></html>")
    assert _console_errors(_render(broken, tmp_path / "broken.png"))
    artifacts = Path(os.environ.get("EDGEDERM_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "evaluation-report.png"
    log = _render(page, shot)
    assert _console_errors(log) == []
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.shape[1] == 1200
    assert pixels.std() > 10  # a page with text and plots, not a blank one
    record_property("figure:report screenshot", str(shot))


# --------------------------------------------------------------------------- Ray


def _local_ray():
    """A local two-CPU Ray instance, or a skip saying why there is none."""
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install 'edgederm[ray]'); evaluate --ray is not run here")
    try:
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # a sandbox without the ports or shared memory Ray needs
        pytest.skip(f"a local Ray instance could not start: {exc}")
    return ray


@pytest.mark.slow
def test_ray_gives_the_numbers_of_a_single_process(darkness_bundle, flat_data, tmp_path):
    ray = _local_ray()
    try:
        options = dict(precisions=["fp32"], by=["skin_tone"], n_boot=100, limit=30)
        on_ray = evaluate(darkness_bundle, flat_data, tmp_path / "ray", EvaluateOptions(ray="local", workers=2, **options))
        local = evaluate(darkness_bundle, flat_data, tmp_path / "local", EvaluateOptions(**options))
    finally:
        ray.shutdown()
    assert on_ray["precisions"] == local["precisions"]
    assert on_ray["precisions"]["fp32"]["evaluated"] == 30
