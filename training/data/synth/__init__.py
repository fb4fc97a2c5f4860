"""Synthetic VinDr-SpineXR: spine radiographs with learnable lesions, written in the real layout.

The generator writes what ``read_vindr`` and ``spine-edge data prepare`` expect from the real data::

    OUT/train_images/<image_id>.dicom   OUT/annotations/train.csv
    OUT/test_images/<image_id>.dicom    OUT/annotations/test.csv

It works in three pure steps, so tests can check each one without touching the disk:

1. :func:`plan_dataset` draws studies, normal/abnormal status, lesion classes and DICOM header
   choices for every image (cheap: no pixels).
2. :func:`render_radiograph` turns one :class:`ImageSpec` into uint16 pixels (bone bright) and
   the tight box of every lesion. Rendering is a pure function of the spec: the anatomy, texture
   and noise come from seeds stored in it, so dropping one lesion from a spec changes the pixels
   inside that lesion's box and nowhere else.
3. :func:`generate_dataset` renders and encodes the images in a process pool and writes the CSVs.

Anatomy: a column of vertebral bodies (trabecular texture, cortical rim, rounded corners,
slightly concave endplates) separated by disc spaces, posterior elements with foramina, a
soft-tissue silhouette and per-region extras (skull base and airway, ribs and lungs, pelvis and
bowel gas), exposure gradient, quantum noise, sometimes collimation and a side marker.

Lesions, each with its own signature inside its box: Osteophytes (a beak at a vertebral corner),
Disc space narrowing (endplates closer together and sclerotic), Surgical implant (bright metal),
Spondylolysthesis (a body shifted against its neighbours), Foraminal stenosis (a foramen squeezed
by bone), Vertebral collapse (a wedged, denser body), Other lesions (a lytic or sclerotic blob).

Difficulty (0 easy .. 1 hard) shrinks lesions and their contrast, and grows the normal variants
that mimic them (small corner lipping, disc height and alignment variation, bone islands, small
foramina), and the noise. Lesion sizes are relative to the vertebrae, so they survive
downscaling to a few hundred pixels.

Class frequencies follow the paper: each class is present on an abnormal image with
``PAPER_CLASS_FREQUENCY`` (exactly, conditioned on the image having at least one lesion), and
common classes come with several boxes per image (:data:`INSTANCE_COUNT_PROBABILITIES`). In small
sets the rare classes would be missing, so every split gets at least
``SynthConfig.min_images_per_class`` images of each class (added to abnormal images that lack
it), which over-represents the rarest classes in small sets.

The package follows those steps, one module each: :mod:`.specs` (the records passed between
steps), :mod:`.plan` (step 1), :mod:`.anatomy`, :mod:`.scene` and :mod:`.render` (step 2: normal
anatomy, lesions drawn onto it, rasterising and exposure), :mod:`.dicom` (encoding) and
:mod:`.dataset` (step 3). Import from the package itself; the modules are its internals.
"""

from __future__ import annotations

from spine_edge.training.data.synth.dataset import SynthReport, generate_dataset
from spine_edge.training.data.synth.dicom import encode_dicom
from spine_edge.training.data.synth.plan import (
    INSTANCE_COUNT_PROBABILITIES,
    plan_dataset,
    presence_probabilities,
    sample_image_spec,
    sample_lesion_counts,
)
from spine_edge.training.data.synth.render import render_radiograph
from spine_edge.training.data.synth.specs import (
    DEFAULT_DIFFICULTY,
    DISC_SPACE_NARROWING,
    FORAMINAL_STENOSIS,
    OSTEOPHYTES,
    OTHER_LESIONS,
    PROJECTIONS,
    REGIONS,
    SPLITS,
    SPONDYLOLYSTHESIS,
    SURGICAL_IMPLANT,
    VERTEBRAL_COLLAPSE,
    DicomHeader,
    ImageJob,
    ImageSpec,
    LesionBox,
    LesionSpec,
    Rendering,
    SynthConfig,
)

__all__ = [
    "DEFAULT_DIFFICULTY",
    "DISC_SPACE_NARROWING",
    "FORAMINAL_STENOSIS",
    "INSTANCE_COUNT_PROBABILITIES",
    "OSTEOPHYTES",
    "OTHER_LESIONS",
    "PROJECTIONS",
    "REGIONS",
    "SPLITS",
    "SPONDYLOLYSTHESIS",
    "SURGICAL_IMPLANT",
    "VERTEBRAL_COLLAPSE",
    "DicomHeader",
    "ImageJob",
    "ImageSpec",
    "LesionBox",
    "LesionSpec",
    "Rendering",
    "SynthConfig",
    "SynthReport",
    "encode_dicom",
    "generate_dataset",
    "plan_dataset",
    "presence_probabilities",
    "render_radiograph",
    "sample_image_spec",
    "sample_lesion_counts",
]
