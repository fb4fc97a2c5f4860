"""Names and numbers fixed by the VinDr-SpineXR dataset and the method."""

from __future__ import annotations

#: Lesion classes, spelled exactly as in VinDr-SpineXR's CSVs ("Spondylolysthesis" sic). The order
#: is the detector's class index order everywhere (YOLO labels, graphs, results, COCO files).
CLASS_NAMES: tuple[str, ...] = (
    "Osteophytes",
    "Surgical implant",
    "Spondylolysthesis",
    "Foraminal stenosis",
    "Disc space narrowing",
    "Vertebral collapse",
    "Other lesions",
)

#: The lesion_type of rows that mark a normal image.
NO_FINDING = "No finding"

#: Share of abnormal images that carry each class, from the paper's dataset table.
PAPER_CLASS_FREQUENCY: dict[str, float] = {
    "Osteophytes": 0.821,
    "Disc space narrowing": 0.558,
    "Surgical implant": 0.302,
    "Spondylolysthesis": 0.223,
    "Foraminal stenosis": 0.157,
    "Other lesions": 0.031,
    "Vertebral collapse": 0.0175,
}

#: Columns of annotations/train.csv and annotations/test.csv.
ANNOTATION_COLUMNS: tuple[str, ...] = (
    "image_id",
    "study_id",
    "series_id",
    "rad_id",
    "lesion_type",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
)

#: DERNet members in ensemble order, with the paper's weights and gate threshold.
PAPER_ENSEMBLE_WEIGHTS: dict[str, float] = {
    "densenet121": 0.42,
    "tf_efficientnetv2_s": 0.32,
    "resnet50": 0.26,
}
PAPER_THRESHOLD = 0.478

#: Ultralytics' letterbox grey, used for the detector input so that training and runtime agree.
DETECTOR_PAD_VALUE = 114
#: Classifier letterbox fill: black, the background of a radiograph.
CLASSIFIER_PAD_VALUE = 0
