"""Tiny fixtures in each public dataset layout: a few images written with OpenCV and a
CSV with the dataset's real header, in the folder structure the dataset ships in.
Used by the readers' tests and by the evaluation's.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 28)) -> np.ndarray:
    """A random RGB image (PNG/BMP lossless, JPEG at quality 100); returns the RGB pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 100] if path.suffix == ".jpg" else []
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    return rgb


def write_mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (20, 28)) -> np.ndarray:
    """0/255 mask with one filled rectangle (top, left, bottom, right); returns it as 0/1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    assert cv2.imwrite(str(path), mask)
    return (mask > 0).astype(np.int64)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------- builders


def make_isic2019(root: Path) -> Path:
    header = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    onehot = {"ISIC_0000000": "NV", "ISIC_0000002": "MEL", "ISIC_0000004": "MEL", "ISIC_0010491": "SCC",
              "ISIC_0024306_downsampled": "VASC"}
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", header,
              [[i] + [1.0 if c == cls else 0.0 for c in header[1:]] for i, cls in onehot.items()])
    write_csv(root / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], [
        ["ISIC_0000000", 55.0, "anterior torso", "", "female"],
        ["ISIC_0000002", 60.0, "upper extremity", "", "female"],
        ["ISIC_0000004", "", "posterior torso", "BCN_0000001", "male"],
        ["ISIC_0010491", 40.0, "", "BCN_0000001", "male"],
        ["ISIC_0024306_downsampled", 45.0, "head/neck", "HAM_0000550", ""],
    ])
    for seed, image in enumerate(onehot):
        write_image(root / "ISIC_2019_Training_Input" / f"{image}.jpg", seed)
    return root


def make_isic2018(root: Path) -> Path:
    header = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    labels = {"ISIC_0024306": "NV", "ISIC_0024307": "BKL", "ISIC_0024308": "AKIEC", "ISIC_0024309": "DF"}
    write_csv(root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", header,
              [[i] + [1.0 if c == cls else 0.0 for c in header[1:]] for i, cls in labels.items()])
    write_csv(root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_LesionGroupings.csv",
              ["image", "lesion_id", "diagnosis_confirm_type"], [["ISIC_0024306", "HAM_0000118", "histopathology"]])
    for seed, image in enumerate(labels):
        write_image(root / "ISIC2018_Task3_Training_Input" / f"{image}.jpg", seed)
    return root


def make_ham10000(root: Path) -> Path:
    rows: list[list[object]] = [
        ["HAM_0000118", "ISIC_0027419", "bkl", "histo", 80.0, "male", "scalp"],
        ["HAM_0000118", "ISIC_0025030", "bkl", "histo", 80.0, "male", "scalp"],
        ["HAM_0002730", "ISIC_0026769", "mel", "histo", "", "female", "back"],
        ["HAM_0001466", "ISIC_0031633", "nv", "follow_up", 75.0, "unknown", "unknown"],
        ["HAM_0002761", "ISIC_0029176", "vasc", "consensus", 60.0, "male", "lower extremity"],
    ]
    write_csv(root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows)
    for seed, row in enumerate(rows):
        part = "HAM10000_images_part_1" if seed < 3 else "HAM10000_images_part_2"
        write_image(root / part / f"{row[1]}.jpg", seed)
    return root


PAD_HEADER = ["patient_id", "lesion_id", "smoke", "drink", "background_father", "background_mother", "age", "pesticide",
              "gender", "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system", "fitspatrick",
              "region", "diameter_1", "diameter_2", "diagnostic", "itch", "grew", "hurt", "changed", "bleed",
              "elevation", "img_id", "biopsed"]


def make_pad(root: Path) -> Path:
    rows: list[list[object]] = [
        ["PAT_1516", 1765, "", "", "", "", 8, "", "", "", "", "", "", "", "ARM", "", "", "NEV",
         "False", "False", "False", "False", "False", "False", "PAT_1516_1765_530.png", "False"],
        ["PAT_46", 881, "False", "False", "POMERANIA", "POMERANIA", 55, "False", "FEMALE", "True", "True", "True",
         "True", 3.0, "NECK", 6.0, 5.0, "BCC", "True", "True", "False", "True", "True", "True", "PAT_46_881_939.png", "True"],
        ["PAT_1545", 1867, "", "", "", "", 77, "", "", "", "", "", "", "", "FACE", "", "", "ACK",
         "True", "UNK", "False", "UNK", "False", "False", "PAT_1545_1867_547.png", "False"],
        ["PAT_684", 1302, "True", "False", "BRASIL", "ITALY", 79, "True", "MALE", "True", "False", "False",
         "False", 2.0, "CHEST", 15.0, 10.0, "SEK", "False", "True", "False", "False", "False", "True",
         "PAT_684_1302_588.png", "False"],
    ]
    write_csv(root / "metadata.csv", PAD_HEADER, rows)
    for seed, row in enumerate(rows):
        write_image(root / "images" / f"imgs_part_{1 + seed % 2}" / str(row[24]), seed)
    return root


DERM7PT_HEADER = ["case_num", "diagnosis", "seven_point_score", "pigment_network", "streaks", "pigmentation",
                  "regression_structures", "dots_and_globules", "blue_whitish_veil", "vascular_structures",
                  "level_of_diagnostic_difficulty", "elevation", "location", "sex", "clinic", "derm", "management", "notes"]


def make_derm7pt(root: Path) -> Path:
    base = root / "release_v0"
    cases = [
        ("basal cell carcinoma", "flat", "abdomen", "female", "NEL/Nel026.jpg", "NEL/Nel025.jpg"),
        ("clark nevus", "palpable", "back", "male", "Aal/Aal002.jpg", "Aal/Aal001.jpg"),
        ("melanoma (in situ)", "flat", "upper limbs", "female", "Fal/Fal012.jpg", "Fal/Fal011.jpg"),
        ("vascular lesion", "nodular", "head neck", "", "Gcl/Gcl025.jpg", "Gcl/Gcl024.jpg"),
        ("seborrheic keratosis", "palpable", "lower limbs", "male", "Nml/Nml008.jpg", ""),
    ]
    rows = []
    for i, (dx, elevation, location, sex, derm, clinic) in enumerate(cases):
        rows.append([i + 1, dx, 0, "absent", "absent", "absent", "absent", "absent", "absent", "absent",
                     "medium", elevation, location, sex, clinic, derm, "excision", ""])
        write_image(base / "images" / derm, i)
        if clinic:
            write_image(base / "images" / clinic, 10 + i)
    write_csv(base / "meta" / "meta.csv", DERM7PT_HEADER, rows)
    write_csv(base / "meta" / "train_indexes.csv", ["indexes"], [[0], [1], [2]])
    write_csv(base / "meta" / "valid_indexes.csv", ["indexes"], [[3]])
    write_csv(base / "meta" / "test_indexes.csv", ["indexes"], [[4]])
    return root


SEG_BOXES = {"ISIC_0000000": (2, 3, 10, 12), "ISIC_0000001": (5, 10, 18, 26), "ISIC_0000003": (0, 0, 20, 14)}


def make_isic2018_segmentation(root: Path) -> Path:
    for seed, (image_id, box) in enumerate(SEG_BOXES.items()):
        write_image(root / "ISIC2018_Task1-2_Training_Input" / f"{image_id}.jpg", seed)
        write_mask(root / "ISIC2018_Task1_Training_GroundTruth" / f"{image_id}_segmentation.png", box)
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("CC-0")
    return root


def make_isic2016_segmentation(root: Path) -> Path:
    for seed, (image_id, box) in enumerate(SEG_BOXES.items()):
        write_image(root / "ISBI2016_ISIC_Part1_Training_Data" / f"{image_id}.jpg", seed)
        write_mask(root / "ISBI2016_ISIC_Part1_Training_GroundTruth" / f"{image_id}_Segmentation.png", box)
    return root


PH2_TXT = """\
||   Name   ||  Histological Diagnosis  || Clinical Diagnosis || Asymmetry || Pigment Network || Dots/Globules || Streaks || Regression Areas || Blue-Whitish Veil ||      Colors      ||
||  IMD003  ||                          ||         0          ||     0     ||        T        ||       A       ||    A    ||        A         ||         A         ||     4            ||
||  IMD009  ||                          ||         1          ||     1     ||        T        ||       AT      ||    A    ||        A         ||         A         ||     3  4         ||
||  IMD058  ||      Melanoma            ||         2          ||     2     ||        AT       ||       AT      ||    P    ||        P         ||         P         ||     1  3  4  5  6||
||  IMD101  ||      Dermal Nevus        ||         0          ||     0     ||        T        ||       A       ||    A    ||        A         ||         A         ||     4            ||

Legends:
Clinical Diagnosis: 0 - Common Nevus; 1 - Atypical Nevus; 2 - Melanoma
"""
PH2_LABELS = {"IMD003": 0, "IMD009": 1, "IMD058": 2, "IMD101": 0}
PH2_BOXES = {"IMD003": (1, 1, 9, 9), "IMD009": (4, 6, 16, 20), "IMD058": (0, 10, 20, 28), "IMD101": (10, 2, 19, 8)}


def make_ph2(root: Path) -> Path:
    base = root / "PH2Dataset"
    for seed, case in enumerate(PH2_LABELS):
        folder = base / "PH2 Dataset images" / case
        write_image(folder / f"{case}_Dermoscopic_Image" / f"{case}.bmp", seed)
        write_mask(folder / f"{case}_lesion" / f"{case}_lesion.bmp", PH2_BOXES[case])
        write_mask(folder / f"{case}_roi" / f"{case}_R1_Label4.bmp", (0, 0, 3, 3))
    (base / "PH2_dataset.txt").write_text(PH2_TXT)
    return root


def make_folder(root: Path) -> Path:
    for seed, (name, n) in enumerate([("melanoma", 2), ("nevus", 3), ("vascular", 1)]):
        for i in range(n):
            write_image(root / name / f"{name}_{i}.png", 10 * seed + i)
    (root / "empty_class").mkdir()
    return root


CLINIC_SCHEMA = {
    "name": "clinic_v1",
    "fields": [
        {"name": "age", "type": "numeric", "min": 0, "max": 100},
        {"name": "site", "type": "categorical", "categories": ["face", "trunk", "limb"]},
        {"name": "fitzpatrick", "type": "categorical", "categories": ["I", "II", "III", "IV", "V", "VI"]},
    ],
}


def make_clinic_csv(root: Path, site: str = "limb") -> Path:
    write_image(root / "photos" / "2024" / "a.jpg", 1)
    write_image(root / "photos" / "2024" / "b.jpg", 2)
    write_image(root / "photos" / "2025" / "c.jpg", 3)
    write_mask(root / "masks" / "a.png", (3, 3, 9, 9))
    write_csv(root / "dataset.csv", ["image", "label", "age", "site", "fitzpatrick", "mask", "patient_id", "referrer"], [
        ["photos/2024/a.jpg", "melanoma", 61, "trunk", "II", "masks/a.png", "P1", "dr_x"],
        ["photos/2024/b.jpg", "benign", "", "face", "", "", "P1", "dr_y"],
        ["photos/2025/c.jpg", "benign", 35, site, "IV", "", "P2", "dr_x"],
    ])
    (root / "schema.json").write_text(json.dumps(CLINIC_SCHEMA))
    return root


# --------------------------------------------------------------------------- public layouts
