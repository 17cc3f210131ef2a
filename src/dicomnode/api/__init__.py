"""The operator surface: JSON API, Prometheus ``/metrics`` and the dashboard (``/ui``).

:func:`create_api` builds the FastAPI application over :class:`ApiServices`
(the node's stores, never its vault); :class:`ApiServer` serves it from a thread
of the node process. See DESIGN.md, "Operator surface".
"""

from dicomnode.api.factory import create_api
from dicomnode.api.server import ApiServer
from dicomnode.api.services import ApiServices
from dicomnode.api.settings import ApiSettings

__all__ = ["ApiServer", "ApiServices", "ApiSettings", "create_api"]
