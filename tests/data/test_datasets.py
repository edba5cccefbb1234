"""Dataset readers: tiny fixtures in each public layout, read back and checked.

Each builder writes a few images with OpenCV and a CSV with the dataset's real
header, in the folder structure the dataset ships in. The tests check labels, class
names, metadata values and their schema encoding (dimensions, missing slots, unknown
categories), mask pairing, auto-detection, and the errors for broken layouts.
"""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgederm.data import (
    DERM7PT_CLASSES,
    HAM10000_CLASSES,
    PAD_UFES_20_CLASSES,
    PH2_CLASSES,
    detect_layout,
    load_labelled_images,
    read_dataset,
)
from edgederm.runtime.errors import InputError
from edgederm.runtime.metadata import load_schema
from edgederm.runtime.preprocess import PreprocessConfig
from tests.layout_fixtures import (
    CLINIC_SCHEMA,
    PH2_BOXES,
    PH2_LABELS,
    SEG_BOXES,
    make_clinic_csv,
    make_derm7pt,
    make_folder,
    make_ham10000,
    make_isic2016_segmentation,
    make_isic2018,
    make_isic2018_segmentation,
    make_isic2019,
    make_pad,
    make_ph2,
    write_csv,
    write_image,
)

CONFIG = PreprocessConfig(input_size=(16, 16))


def test_isic2019_one_hot_labels_metadata_and_unk_dropped(tmp_path):
    ds = read_dataset(make_isic2019(tmp_path))
    assert ds.layout == "isic"
    assert ds.class_names == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")  # UNK has no image: dropped
    assert any("UNK" in note for note in ds.notes)
    assert {r.id: r.class_name for r in ds} == {"ISIC_0000000": "NV", "ISIC_0000002": "MEL", "ISIC_0000004": "MEL",
                                                "ISIC_0010491": "SCC", "ISIC_0024306_downsampled": "VASC"}
    by_id = {r.id: r for r in ds}
    assert by_id["ISIC_0000004"].metadata == {"age_approx": None, "anatom_site_general": "posterior torso", "sex": "male"}
    assert by_id["ISIC_0000004"].group == "BCN_0000001" and by_id["ISIC_0000000"].group is None
    assert ds.schema is not None and ds.schema.name == "isic2019" and ds.schema.dim == 2 + 9 + 3
    matrix = ds.metadata_matrix()
    row = matrix[[r.id for r in ds].index("ISIC_0000004")]
    assert row[:2].tolist() == [0.0, 1.0]  # age missing: value 0, missing flag 1
    assert row[2 + 6] == 1.0 and row[2:11].sum() == 1.0  # posterior torso is the 7th site
    assert row[11:].tolist() == [0.0, 1.0, 0.0]  # male
    site_missing = matrix[[r.id for r in ds].index("ISIC_0010491")]
    assert site_missing[2 + 8] == 1.0 and site_missing[2:11].sum() == 1.0  # the site's missing slot
    assert matrix[0, 0] == pytest.approx(0.55)


def test_isic2018_reads_ground_truth_in_its_own_folder(tmp_path):
    ds = read_dataset(make_isic2018(tmp_path), layout="isic2018")
    assert ds.class_names == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert [r.class_name for r in ds] == ["NV", "BKL", "AKIEC", "DF"]
    assert ds.schema is None and all(r.metadata == {} for r in ds)
    assert ds[0].image.parent.name == "ISIC2018_Task3_Training_Input"


def test_isic_row_marking_two_classes_is_an_error(tmp_path):
    make_isic2018(tmp_path)
    table = tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = table.read_text().splitlines()
    lines[2] = "ISIC_0024307,1.0,0.0,0.0,0.0,1.0,0.0,0.0"
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"line 3 \(image 'ISIC_0024307'\) marks 2 classes"):
        read_dataset(tmp_path)


def test_ham10000_labels_groups_and_metadata(tmp_path):
    ds = read_dataset(make_ham10000(tmp_path))
    assert ds.layout == "ham10000" and ds.class_names == HAM10000_CLASSES
    assert [r.class_name for r in ds] == ["bkl", "bkl", "mel", "nv", "vasc"]
    assert [r.group for r in ds][:2] == ["HAM_0000118", "HAM_0000118"]
    assert {r.image.parent.name for r in ds} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert ds[2].metadata == {"age": None, "sex": "female", "localization": "back"}
    assert "dx_type" not in ds[0].metadata  # leaks the label
    matrix = ds.metadata_matrix()
    assert matrix.shape == (5, 22)
    assert matrix[2, :2].tolist() == [0.0, 1.0]
    assert matrix[0, :2].tolist() == pytest.approx([0.8, 0.0])
    # "unknown" is a value HAM10000 records: its own category, not the missing slot.
    schema = load_schema("ham10000")
    sex = schema.fields[1]["categories"]
    assert matrix[3, 2 + sex.index("unknown")] == 1.0 and matrix[3, 2 + len(sex)] == 0.0
    # the lesion ids reach training, which keeps each lesion on one side of the split
    assert load_labelled_images(ds, CONFIG).groups == [r.group for r in ds]


def test_ham10000_unknown_category_names_field_and_allowed_values(tmp_path):
    make_ham10000(tmp_path)
    table = tmp_path / "HAM10000_metadata.csv"
    table.write_text(table.read_text().replace("lower extremity", "elbow"))
    with pytest.raises(InputError, match=r"line 6: metadata field 'localization' has value 'elbow'; allowed: \[.*'upper extremity'\]"):
        read_dataset(tmp_path)


def test_schema_asking_for_a_label_leaking_field_is_refused(tmp_path):
    make_ham10000(tmp_path)
    leaky = {"name": "bad", "fields": [{"name": "dx_type", "type": "categorical", "categories": ["histo", "follow_up"]}]}
    with pytest.raises(InputError, match="'dx_type'.*leaks the diagnosis"):
        read_dataset(tmp_path, schema=leaky)
    only_age = {"name": "age_only", "fields": [{"name": "age", "type": "numeric", "min": 0, "max": 100}]}
    ds = read_dataset(tmp_path, schema=only_age)
    assert ds[0].metadata == {"age": 80.0} and ds.metadata_matrix().shape == (5, 2)


def test_pad_ufes_20_metadata_encoding_and_missing_answers(tmp_path):
    ds = read_dataset(make_pad(tmp_path))
    assert ds.layout == "pad_ufes_20" and ds.class_names == PAD_UFES_20_CLASSES
    assert [r.class_name for r in ds] == ["NEV", "BCC", "ACK", "SEK"]
    assert [r.id for r in ds][0] == "PAT_1516_1765_530" and ds[0].group == "PAT_1516"
    assert ds.schema.dim == 102  # MetaBlock's 81 + 18 missing slots + 3 numeric missing flags
    assert len(ds[0].metadata) == 21 and "biopsed" not in ds[0].metadata
    assert ds[1].metadata["fitspatrick"] == "3.0" and ds[1].metadata["diameter_1"] == 6.0
    matrix = ds.metadata_matrix()
    fields = ds.schema.fields

    def slots(name: str, row: int) -> list[float]:
        start = 0
        for f in fields:
            width = len(f["categories"]) + 1 if f["type"] == "categorical" else 2
            if f["name"] == name:
                return matrix[row, start:start + width].tolist()
            start += width
        raise KeyError(name)

    assert slots("smoke", 0) == [0.0, 0.0, 1.0]  # unanswered: the missing slot
    assert slots("smoke", 3) == [0.0, 1.0, 0.0]
    assert slots("grew", 2) == [0.0, 0.0, 1.0, 0.0]  # UNK is a recorded answer, not missing
    assert slots("diameter_1", 0) == [0.0, 1.0] and slots("diameter_1", 3) == pytest.approx([0.15, 0.0])
    assert slots("background_father", 3)[["AUSTRIA", "BRASIL"].index("BRASIL")] == 1.0


def test_pad_unknown_region_is_an_error(tmp_path):
    make_pad(tmp_path)
    table = tmp_path / "metadata.csv"
    table.write_text(table.read_text().replace("CHEST", "KNEE"))
    with pytest.raises(InputError, match=r"field 'region' has value 'KNEE'; allowed: \['ABDOMEN', 'ARM'"):
        read_dataset(tmp_path, layout="pad_ufes_20")


def test_derm7pt_five_classes_clinical_images_splits_and_no_leaks(tmp_path):
    ds = read_dataset(make_derm7pt(tmp_path))
    assert ds.layout == "derm7pt" and ds.class_names == DERM7PT_CLASSES
    assert [r.class_name for r in ds] == ["BCC", "NEV", "MEL", "MISC", "SK"]
    assert [r.split for r in ds] == ["train", "train", "train", "valid", "test"]
    assert ds[0].image.name == "Nel026.jpg" and ds[0].clinical.name == "Nel025.jpg" and ds[4].clinical is None
    assert all(set(r.metadata) == {"elevation", "sex", "location"} for r in ds)
    matrix = ds.metadata_matrix()
    assert matrix.shape == (5, 17)
    assert matrix[3, 4 + 2] == 1.0  # sex missing -> the sex field's missing slot (after elevation's 4 slots)


def test_isic2018_segmentation_pairs_masks_with_their_images(tmp_path):
    ds = read_dataset(make_isic2018_segmentation(tmp_path))
    assert ds.layout == "isic_segmentation" and ds.class_names == ()
    assert [r.id for r in ds] == list(SEG_BOXES)
    assert all(r.mask.name == f"{r.id}_segmentation.png" and r.label is None for r in ds)
    config = PreprocessConfig(input_size=(20, 28))  # the image's own size: masks come back exactly
    data = load_labelled_images(ds, config, masks=True)
    assert data.y.tolist() == [-1, -1, -1] and data.masks.shape == (3, 20, 28)
    for i, box in enumerate(SEG_BOXES.values()):
        expected = np.zeros((20, 28), np.int64)
        expected[box[0]:box[2], box[1]:box[3]] = 1
        np.testing.assert_array_equal(data.masks[i], expected)
    with pytest.raises(InputError, match="no diagnosis label.*masks=True"):
        load_labelled_images(ds, config)


def test_isic2016_capitalised_masks_and_2017_superpixels(tmp_path):
    make_isic2016_segmentation(tmp_path)
    write_image(tmp_path / "ISBI2016_ISIC_Part1_Training_Data" / "ISIC_0000000_superpixels.png", 9)
    ds = read_dataset(tmp_path)
    assert ds.layout == "isic_segmentation" and [r.id for r in ds] == list(SEG_BOXES)
    assert ds[0].mask.name == "ISIC_0000000_Segmentation.png" and ds[0].image.suffix == ".jpg"


def test_segmentation_image_without_mask_is_an_error(tmp_path):
    make_isic2018_segmentation(tmp_path)
    write_image(tmp_path / "ISIC2018_Task1-2_Validation_Input" / "ISIC_0012255.jpg", 5)
    with pytest.raises(InputError, match=r"1 image\(s\) .* have no <id>_segmentation.png mask .*ISIC_0012255"):
        read_dataset(tmp_path)


def test_ph2_labels_from_txt_and_lesion_masks(tmp_path):
    ds = read_dataset(make_ph2(tmp_path))
    assert ds.layout == "ph2" and ds.class_names == PH2_CLASSES
    assert {r.id: r.label for r in ds} == PH2_LABELS
    assert all(r.mask.name == f"{r.id}_lesion.bmp" and r.image.suffix == ".bmp" for r in ds)
    data = load_labelled_images(ds, PreprocessConfig(input_size=(20, 28)), masks=True)
    for i, record in enumerate(ds):
        top, left, bottom, right = PH2_BOXES[record.id]
        assert data.masks[i].sum() == (bottom - top) * (right - left)
        assert data.masks[i, top:bottom, left:right].all()
    assert data.y.tolist() == [PH2_LABELS[r.id] for r in ds]


def test_ph2_xlsx_labels(tmp_path):
    openpyxl = pytest.importorskip("openpyxl", reason="openpyxl is optional; PH2_dataset.xlsx needs it")
    make_ph2(tmp_path)
    (tmp_path / "PH2Dataset" / "PH2_dataset.txt").unlink()
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["PH2 database"])
    sheet.append(["Image Name", "Histological Diagnosis", "Common Nevus", "Atypical Nevus", "Melanoma"])
    for case, label in PH2_LABELS.items():
        sheet.append([case, None] + ["X" if j == label else None for j in range(3)])
    book.save(tmp_path / "PH2Dataset" / "PH2_dataset.xlsx")
    assert {r.id: r.label for r in read_dataset(tmp_path)} == PH2_LABELS


def test_ph2_without_label_file_reads_masks_only(tmp_path):
    make_ph2(tmp_path)
    (tmp_path / "PH2Dataset" / "PH2_dataset.txt").unlink()
    ds = read_dataset(tmp_path, layout="ph2")
    assert ds.class_names == () and all(r.label is None and r.mask is not None for r in ds)
    assert any("no labels" in note for note in ds.notes)


# --------------------------------------------------------------------------- generic layouts


def test_folder_per_class(tmp_path):
    ds = read_dataset(make_folder(tmp_path))
    assert ds.layout == "folder" and ds.class_names == ("melanoma", "nevus", "vascular")
    assert ds.class_counts() == {"melanoma": 2, "nevus": 3, "vascular": 1}
    assert ds[0].id == "melanoma/melanoma_0"
    assert any("empty_class" in note for note in ds.notes)
    data = load_labelled_images(ds, CONFIG)
    assert data.x.shape == (6, 3, 16, 16) and data.y.tolist() == [0, 0, 1, 1, 1, 2]


def test_split_folders_are_not_mistaken_for_classes(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test")
    with pytest.raises(InputError, match="cannot tell the layout"):
        read_dataset(tmp_path)
    with pytest.raises(InputError, match=r"\['test', 'train'\] each hold the same sub-folders .* look like splits"):
        read_dataset(tmp_path, layout="folder")
    assert read_dataset(tmp_path / "train").class_names == ("melanoma", "nevus", "vascular")


def test_clinic_csv_with_user_schema(tmp_path):
    make_clinic_csv(tmp_path)
    ds = read_dataset(tmp_path / "dataset.csv", schema=tmp_path / "schema.json")
    assert ds.layout == "csv" and ds.class_names == ("benign", "melanoma")
    assert [r.label for r in ds] == [1, 0, 0]
    assert [r.id for r in ds] == ["photos/2024/a", "photos/2024/b", "photos/2025/c"]
    assert [r.group for r in ds] == ["P1", "P1", "P2"]
    assert ds[0].metadata == {"age": 61.0, "site": "trunk", "fitzpatrick": "II"}  # referrer is not in the schema
    assert ds[0].mask == tmp_path / "masks" / "a.png" and ds[1].mask is None
    matrix = ds.metadata_matrix()
    assert matrix.shape == (3, 2 + 4 + 7)
    assert matrix[1].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # age and fitzpatrick missing
    # The folder holding one CSV is detected as well; without a schema every extra column is kept raw.
    raw = read_dataset(tmp_path)
    assert raw.layout == "csv" and raw[0].metadata == {"age": "61", "site": "trunk", "fitzpatrick": "II", "referrer": "dr_x"}


def test_clinic_csv_unknown_category_and_missing_column(tmp_path):
    make_clinic_csv(tmp_path, site="scalp")
    with pytest.raises(InputError, match=r"line 4: metadata field 'site' has value 'scalp'; allowed: \['face', 'trunk', 'limb'\]"):
        read_dataset(tmp_path, schema=tmp_path / "schema.json")
    schema = dict(CLINIC_SCHEMA, fields=CLINIC_SCHEMA["fields"] + [{"name": "itch", "type": "categorical", "categories": ["no", "yes"]}])
    with pytest.raises(InputError, match=r"needs field\(s\) \['itch'\]"):
        read_dataset(tmp_path, schema=schema)


def test_clinic_csv_missing_file_is_named(tmp_path):
    make_clinic_csv(tmp_path)
    (tmp_path / "photos" / "2025" / "c.jpg").unlink()
    with pytest.raises(InputError, match=r"line 4: photos/2025/c.jpg"):
        read_dataset(tmp_path)


def _labels_csv_reference(root: Path) -> list[dict[str, str]]:
    """labels.csv read by the standard library alone: what every reader must agree with."""
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_labels_csv_reader_agrees_with_the_file(tmp_path):
    """The edgederm layout, read_image_folder and the synthetic data's reader see the same table."""
    from edgederm.data import read_image_folder
    from edgederm.data.synthetic import generate_dataset, read_labels_csv

    root = generate_dataset(tmp_path / "synthetic", n_per_class=2, size=48, seed=3)
    rows = _labels_csv_reference(root)
    ds = read_dataset(root)
    assert ds.layout == "edgederm" and ds.class_names == ("nevus", "melanoma", "vascular")
    assert [r.id for r in ds] == [row["id"] for row in rows]
    assert [r.label for r in ds] == [int(row["label"]) for row in rows]
    assert [r.class_name for r in ds] == [row["class_name"] for row in rows]
    assert [r.image for r in ds] == [root / "images" / f"{row['id']}.jpg" for row in rows]
    assert [r.mask for r in ds] == [root / "masks" / f"{row['id']}.png" for row in rows]
    assert [r.metadata for r in ds] == [{"age": int(row["age"]), "sex": row["sex"], "site": row["site"],
                                         "skin_tone": int(row["skin_tone"])} for row in rows]
    synthetic = read_labels_csv(root)
    assert synthetic == [{"id": r.id, "label": r.label, "class_name": r.class_name, **r.metadata} for r in ds]

    config = PreprocessConfig(input_size=(32, 32))
    ours = load_labelled_images(ds, config, masks=True)
    folder = read_image_folder(root, config, masks=True)
    np.testing.assert_array_equal(folder.x, ours.x)
    np.testing.assert_array_equal(folder.masks, ours.masks)
    assert folder.ids == ours.ids and folder.class_names == list(ds.class_names) and folder.records == ours.records
    np.testing.assert_array_equal(folder.y, [int(row["label"]) for row in rows])
    # Masks against nearest-neighbour resizing of the files: the reader takes the majority
    # of the source pixels under each output pixel, so they may differ only on the lesion border.
    nearest = np.stack([cv2.resize(cv2.imread(str(root / "masks" / f"{row['id']}.png"), cv2.IMREAD_GRAYSCALE), (32, 32),
                                   interpolation=cv2.INTER_NEAREST) > 127 for row in rows]).astype(np.int64)
    differ = ours.masks != nearest
    assert differ.mean() < 0.03
    border = np.stack([cv2.dilate(m.astype(np.uint8), np.ones((3, 3))) != cv2.erode(m.astype(np.uint8), np.ones((3, 3)))
                       for m in nearest])
    assert not (differ & ~border).any()
    np.testing.assert_array_equal(ours.metadata("synthetic"), load_schema("synthetic").encode_many(
        [{"age": int(row["age"]), "sex": row["sex"], "site": row["site"]} for row in rows]))


def test_labels_csv_errors_name_file_and_line(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 0)
    write_csv(tmp_path / "labels.csv", ["id", "label", "class_name"], [["a", "one", "nevus"]])
    with pytest.raises(InputError, match=r"labels.csv line 2: label 'one' is not an integer class index"):
        read_dataset(tmp_path, layout="edgederm")
    write_csv(tmp_path / "labels.csv", ["id", "label", "class_name"], [["a", "0", "nevus"], ["b", "1", "melanoma"]])
    with pytest.raises(InputError, match=r"lists 1 id\(s\) with no image in .*images \(e.g. \['b'\]\)"):
        read_dataset(tmp_path, layout="edgederm")
    # an empty label is "no diagnosis": fine for segmentation, refused for classification
    write_csv(tmp_path / "labels.csv", ["id", "label", "class_name"], [["a", "", ""]])
    unlabelled = read_dataset(tmp_path, layout="edgederm")
    assert unlabelled[0].label is None and unlabelled.class_names == ()
    with pytest.raises(InputError, match=r"1 of 1 records have no diagnosis label"):
        load_labelled_images(unlabelled, CONFIG)


def test_letterboxed_mask_stays_on_its_lesion(tmp_path):
    """A non-square image under letterbox: mask pixels land where the lesion's pixels land."""
    image = np.full((30, 60, 3), 40, np.uint8)
    image[6:24, 10:40] = 220  # the bright "lesion"
    mask = np.zeros((30, 60), np.uint8)
    mask[6:24, 10:40] = 255
    cv2.imwrite(str(tmp_path / "case.png"), image)
    cv2.imwrite(str(tmp_path / "case_mask.png"), mask)
    write_csv(tmp_path / "data.csv", ["image", "label", "mask"], [["case.png", "lesion", "case_mask.png"]])
    config = PreprocessConfig(input_size=(32, 32), resize="letterbox", mean=(0, 0, 0), std=(1, 1, 1))
    data = load_labelled_images(read_dataset(tmp_path), config, masks=True)
    bright = data.x[0, 0] > 0.5
    assert data.masks[0].sum() > 50
    assert (data.masks[0].astype(bool) == bright).mean() > 0.97
    assert not data.masks[0, :8].any()  # the letterbox band is background


# --------------------------------------------------------------------------- detection and errors


@pytest.mark.parametrize("builder, layout", [
    (make_isic2019, "isic"), (make_isic2018, "isic"), (make_ham10000, "ham10000"), (make_pad, "pad_ufes_20"),
    (make_derm7pt, "derm7pt"), (make_isic2018_segmentation, "isic_segmentation"),
    (make_isic2016_segmentation, "isic_segmentation"), (make_ph2, "ph2"), (make_folder, "folder"),
    (make_clinic_csv, "csv"),
])
def test_auto_detection_picks_the_layout(tmp_path, builder, layout):
    assert detect_layout(builder(tmp_path))[0] == layout
    # Pointing one level above the extracted folder works too (except for the generic layouts).
    if layout not in ("folder", "csv"):
        parent = tmp_path.parent / f"{tmp_path.name}_outer"
        parent.mkdir()
        (parent / "dataset").symlink_to(tmp_path, target_is_directory=True)
        assert detect_layout(parent)[0] == layout


def test_undetectable_folder_lists_what_it_found_and_what_layouts_expect(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(InputError, match=r"(?s)cannot tell the layout .* 2 entries: notes.txt, stuff/.*ham10000: HAM10000_metadata.csv.*--layout"):
        read_dataset(tmp_path)


def test_two_public_layouts_in_one_folder_is_ambiguous(tmp_path):
    make_isic2018(tmp_path)
    make_isic2018_segmentation(tmp_path)
    with pytest.raises(InputError, match=r"several dataset layouts: isic .*; isic_segmentation .*layout="):
        read_dataset(tmp_path)
    assert read_dataset(tmp_path, layout="isic").layout == "isic"


def test_explicit_layout_that_does_not_fit_says_what_it_expects(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(InputError, match=r"no HAM10000_metadata.csv in .*expects HAM10000_metadata.csv \(lesion_id"):
        read_dataset(tmp_path, layout="ham10000")
    with pytest.raises(InputError, match=r"layout 'hamm' is not known; allowed: auto, edgederm"):
        read_dataset(tmp_path, layout="hamm")


def test_missing_images_are_reported(tmp_path):
    make_ham10000(tmp_path)
    (tmp_path / "HAM10000_images_part_2" / "ISIC_0029176.jpg").unlink()
    with pytest.raises(InputError, match=r"1 image\(s\) that are not below .*ISIC_0029176"):
        read_dataset(tmp_path)


def test_unknown_diagnosis_is_an_error(tmp_path):
    make_derm7pt(tmp_path)
    table = tmp_path / "release_v0" / "meta" / "meta.csv"
    table.write_text(table.read_text().replace("clark nevus", "wart"))
    with pytest.raises(InputError, match=r"diagnosis 'wart' is not one of Derm7pt's"):
        read_dataset(tmp_path)


def test_classes_argument_fixes_the_order(tmp_path):
    ds = read_dataset(make_folder(tmp_path), classes=["nevus", "melanoma", "vascular", "other"])
    assert ds.class_names == ("nevus", "melanoma", "vascular", "other")
    assert ds.class_counts() == {"nevus": 3, "melanoma": 2, "vascular": 1, "other": 0}
    with pytest.raises(InputError, match=r"lacks \['vascular'\]"):
        read_dataset(tmp_path, classes=["nevus", "melanoma"])


def test_cli_train_reads_a_public_layout(tmp_path, capsys, monkeypatch, torch):
    """`edgederm train DATA --layout ham10000` hands the trainer the HAM10000 images and classes."""
    import edgederm.train
    from edgederm.cli import main

    seen = {}

    def fake_train(data, cfg, out_dir=None, preprocess=None, **kwargs):
        # The trainer itself is covered by the pipeline tests; here only what reaches it.
        seen.update(data=data, cfg=cfg, preprocess=preprocess)
        return None, {"val_accuracy": 0.5}

    monkeypatch.setattr(edgederm.train, "train", fake_train)
    make_ham10000(tmp_path / "ham")
    assert main(["train", str(tmp_path / "ham"), "--layout", "ham10000", "--model", "hifuse_tiny", "--epochs", "1",
                 "--out", str(tmp_path / "ckpt")]) == 0
    assert "ham10000: 5 images" in capsys.readouterr().err
    data = seen["data"]
    assert data.class_names == list(HAM10000_CLASSES)
    assert data.y.tolist() == [2, 2, 4, 5, 6]
    assert data.x.shape == (5, 3, *seen["preprocess"].input_size)
    assert data.records[2] == {"age": None, "sex": "female", "localization": "back"}
    assert data.metadata("ham10000").shape == (5, 22)
    assert main(["train", str(tmp_path / "ham"), "--layout", "ham10001", "--out", str(tmp_path / "ckpt")]) == 2
    assert "layout 'ham10001' is not known" in capsys.readouterr().err
