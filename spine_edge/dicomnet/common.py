"""What the DICOM side shares: its error type, the SOP classes it sorts by, destinations, UIDs, folders.

The storage SCP, the result writers and the outbox all decide with these tables, so "an image we
analyse", "an object we accept but leave alone" and "an image we refuse" mean the same everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from spine_edge.errors import SpineEdgeError

#: Our own Application Entity title unless the operator chooses another.
DEFAULT_AE_TITLE = "SPINEEDGE"

#: Radiograph storage classes the cascade analyses (the reader decodes single-frame gray images).
ANALYSED_SOP_CLASSES: frozenset[str] = frozenset(
    {
        pydicom.uid.DigitalXRayImageStorageForPresentation,
        pydicom.uid.DigitalXRayImageStorageForProcessing,
        pydicom.uid.ComputedRadiographyImageStorage,
        pydicom.uid.SecondaryCaptureImageStorage,
    }
)

#: Cross-sectional images: the bundle was trained on radiographs and must not judge these.
REFUSED_SOP_CLASSES: dict[str, str] = {
    pydicom.uid.CTImageStorage: "CT",
    pydicom.uid.EnhancedCTImageStorage: "CT",
    pydicom.uid.LegacyConvertedEnhancedCTImageStorage: "CT",
    pydicom.uid.MRImageStorage: "MR",
    pydicom.uid.EnhancedMRImageStorage: "MR",
    pydicom.uid.EnhancedMRColorImageStorage: "MR",
    pydicom.uid.LegacyConvertedEnhancedMRImageStorage: "MR",
}

#: Objects a PACS routes along with a study (reports, RT objects, presentation states): accepted so
#: that the sender's association does not fail, never analysed.
PASSIVE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        pydicom.uid.BasicTextSRStorage,
        pydicom.uid.EnhancedSRStorage,
        pydicom.uid.ComprehensiveSRStorage,
        pydicom.uid.Comprehensive3DSRStorage,
        pydicom.uid.KeyObjectSelectionDocumentStorage,
        pydicom.uid.XRayRadiationDoseSRStorage,
        pydicom.uid.RTPlanStorage,
        pydicom.uid.RTStructureSetStorage,
        pydicom.uid.RTDoseStorage,
        pydicom.uid.RTImageStorage,
        pydicom.uid.RTTreatmentSummaryRecordStorage,
        pydicom.uid.GrayscaleSoftcopyPresentationStateStorage,
        pydicom.uid.ColorSoftcopyPresentationStateStorage,
        pydicom.uid.PseudoColorSoftcopyPresentationStateStorage,
        pydicom.uid.BlendingSoftcopyPresentationStateStorage,
        pydicom.uid.EncapsulatedPDFStorage,
    }
)

#: Uncompressed transfer syntaxes: every peer can fall back to one of these.
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
)

_COMPRESSED_CANDIDATES: tuple[UID, ...] = (
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
    pydicom.uid.HTJ2KLossless,
    pydicom.uid.HTJ2KLosslessRPCL,
    pydicom.uid.RLELossless,
    pydicom.uid.JPEGLosslessSV1,
    pydicom.uid.JPEGLossless,
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
)


class DicomNetError(SpineEdgeError):
    """The DICOM side (listener, results as DICOM, sending) cannot do what was asked."""


def image_transfer_syntaxes() -> tuple[UID, ...]:
    """Transfer syntaxes offered for images: uncompressed, plus each compressed one decodable here.

    Offering only what an installed pydicom decoder plugin reads means that an image the listener
    accepts is an image the reader can open; a sender with only other encodings falls back to
    uncompressed during association negotiation.
    """
    decodable = [uid for uid in _COMPRESSED_CANDIDATES if get_decoder(uid).is_available]
    return (*UNCOMPRESSED_TRANSFER_SYNTAXES, *decodable)


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that stores what we send (a PACS, a viewer's archive).

    Attributes:
        host: Host name or IP address.
        port: TCP port of its storage SCP.
        ae_title: Its Application Entity title (the "called AE title").
    """

    host: str
    port: int
    ae_title: str

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title)
        if not 0 < self.port < 65536:
            raise DicomNetError(f"port {self.port} of {self.ae_title}@{self.host} is not a TCP port (1-65535)")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Read ``HOST:PORT:AET``, e.g. ``pacs.local:104:PACS``.

        Raises:
            DicomNetError: The text is not in that form.

        Example:
            >>> Destination.parse("127.0.0.1:4242:ORTHANC")
            Destination(host='127.0.0.1', port=4242, ae_title='ORTHANC')
        """
        host, sep1, rest = text.rpartition(":")
        host, sep2, port = host.rpartition(":")
        if not (sep1 and sep2 and host and port.isdigit() and rest):
            raise DicomNetError(f"{text!r} is not HOST:PORT:AET (for example pacs.local:104:PACS)")
        return cls(host=host, port=int(port), ae_title=rest)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(title: str) -> str:
    """Return ``title`` if it is a valid AE title (1-16 printable ASCII characters, no backslash).

    Raises:
        DicomNetError: It is not.
    """
    if not _AE_TITLE.match(title) or not title.strip():
        raise DicomNetError(f"{title!r} is not a DICOM AE title: use 1-16 printable ASCII characters without backslash")
    return title


def derived_uid(*parts: str) -> UID:
    """A UID determined by ``parts`` (pydicom's prefix + a hash of them).

    Results regenerated after a crash, or for a second copy of the same image, get the same UIDs,
    so a PACS stores them once instead of accumulating duplicates.

    Example:
        >>> derived_uid("1.2.3", "sr") == derived_uid("1.2.3", "sr")
        True
    """
    return pydicom.uid.generate_uid(entropy_srcs=["spine-edge", *parts])


def sop_instance_uid(ds: Dataset) -> str:
    """The data set's SOP Instance UID, or its file meta's when only that is set.

    Raises:
        DicomNetError: Neither is present.
    """
    uid = ds.get("SOPInstanceUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPInstanceUID")
    if not uid:
        raise DicomNetError("the DICOM object has no SOP Instance UID: the sender must set (0008,0018)")
    return str(uid)


def oldest_first(paths: Iterable[Path]) -> list[Path]:
    """Visible files among ``paths``, oldest first; a file removed meanwhile (sent, moved) is left out."""
    dated = []
    for path in paths:
        if path.name.startswith("."):
            continue
        try:
            dated.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue
    return [path for _, path in sorted(dated)]
