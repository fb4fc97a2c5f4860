"""The kiosk process: one loaded Cascade behind a bounded queue, reached over HTTP, DICOM or a folder.

:mod:`spine_edge.service.worker` is the core every way in shares (standard library only);
:mod:`spine_edge.service.app` and :mod:`spine_edge.service.server` add the HTTP service and its page,
which need the ``serve`` extra (``pip install 'spine-edge[serve]'``) and import it lazily.
"""
