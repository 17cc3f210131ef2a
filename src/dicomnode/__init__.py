"""dicomnode: a DICOM network node that puts AI next to a hospital PACS."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
