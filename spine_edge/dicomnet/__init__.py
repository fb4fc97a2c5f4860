"""DICOM in and out: a storage SCP feeding the kiosk's worker, SR (TID 1500) and Secondary Capture
results, and a durable outbox sending them to a PACS.

Modules, in the order data flows:

- :mod:`~spine_edge.dicomnet.scp`: pynetdicom storage SCP writing received radiographs to an inbox.
- :mod:`~spine_edge.dicomnet.sr`, :mod:`~spine_edge.dicomnet.sc`: one result record as a
  Comprehensive SR following TID 1500 and as Secondary Capture images (highdicom).
- :mod:`~spine_edge.dicomnet.writer`: both, written next to the JSON results (``infer --dicom-out``).
- :mod:`~spine_edge.dicomnet.outbox`: files wait on disk until the PACS has stored them.
- :mod:`~spine_edge.dicomnet.gateway`: the four joined around a job queue; replay and resume.
- :mod:`~spine_edge.dicomnet.kiosk`: the gateway on the service's ``InferenceWorker``
  (``spine-edge listen``, ``serve --dicom-port``).

pynetdicom and highdicom come from the ``dicom`` extra and are imported only when used, so every
module here imports without them.
"""
