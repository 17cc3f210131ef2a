"""Settings of the operator API: the ``[api]`` section of :mod:`dicomnode.config`."""

from dicomnode.config import ApiSettings

__all__ = ["ApiSettings"]
