"""Who may use the API: a bearer token, or basic-auth users, from the ``[api]`` settings.

Every route but ``/health/live`` (and ``/metrics`` with ``api.metrics_public``)
depends on :class:`Authenticator`. No credentials: 401 with a challenge for both
schemes (a browser then asks for a user and password). Wrong credentials: 401,
and one ``api_authentication_failed`` audit line with the client address.
Comparisons are constant-time.

Dashboard forms are protected against cross-site requests (a browser sends basic
credentials to any site that posts to us) by a per-user token derived from a
secret of this API instance (:meth:`Authenticator.csrf_token`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)

from dicomnode.audit import audit
from dicomnode.errors import ConfigError

__all__ = ["Authenticator", "Principal", "User", "current_user", "resolve_token"]

_bearer = HTTPBearer(auto_error=False, scheme_name="token",
                     description="The API token (api.token, api.token_file or keys/api.token).")
_basic = HTTPBasic(auto_error=False, scheme_name="basic", realm="dicomnode",
                   description="A user of api.users.")
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="dicomnode", Bearer'}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``api-token`` or ``api:<user>``, and the client address."""

    user: str
    address: str | None


def resolve_token(token: Any, token_file: Path | None, data_dir: Path) -> str:
    """The bearer token: ``api.token``, else ``api.token_file``, else ``keys/api.token``.

    The last is created (32 random bytes, URL-safe, mode 0600) when missing, like the
    pseudonym secret of the embedded default.

    Raises
    ------
    ConfigError
        ``token_file`` is missing, unreadable or holds fewer than 16 characters.
    """
    if token is not None:
        return str(token.get_secret_value())
    if token_file is not None:
        try:
            value = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"api.token_file: cannot read {token_file}: {exc.strerror}") \
                from None
        if len(value) < 16:
            raise ConfigError("api.token_file: the token must be at least 16 characters")
        return value
    path = data_dir / "keys" / "api.token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text(encoding="utf-8").strip()


class Authenticator:
    """The FastAPI dependency that admits a request or answers 401.

    Parameters
    ----------
    token
        The bearer token.
    users
        Basic-auth user name -> password.
    """

    def __init__(self, token: str, users: dict[str, str]) -> None:
        self._token = token.encode()
        self._users = {name: pw.encode() for name, pw in users.items()}
        self._csrf_key = secrets.token_bytes(32)

    def check(self, request: Request, bearer: HTTPAuthorizationCredentials | None,
              basic: HTTPBasicCredentials | None) -> Principal:
        """The caller, or HTTPException 401.

        Raises
        ------
        HTTPException
            401 when credentials are missing or wrong.
        """
        address = request.client.host if request.client else None
        if bearer is not None:
            if hmac.compare_digest(bearer.credentials.encode(), self._token):
                return Principal("api-token", address)
            self._refuse(address, "bearer token not accepted")
        if basic is not None:
            expected = self._users.get(basic.username)
            # compare against something of the same kind even for an unknown user (timing)
            ok = hmac.compare_digest(basic.password.encode(), expected or self._token)
            if ok and expected is not None:
                return Principal(f"api:{basic.username}", address)
            self._refuse(address, "user name or password not accepted", basic.username)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "credentials required",
                            headers=_CHALLENGE)

    def _refuse(self, address: str | None, why: str, user: str | None = None) -> None:
        audit("api_authentication_failed", user=(user or "unknown")[:64], address=address,
              outcome=4, outcome_description=why)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "credentials not accepted",
                            headers=_CHALLENGE)

    def csrf_token(self, principal: Principal) -> str:
        """The form token of ``principal`` (stable for this API instance)."""
        return hmac.new(self._csrf_key, principal.user.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, principal: Principal, value: str | None) -> None:
        """Raises HTTPException 403 unless ``value`` is ``principal``'s form token."""
        if not value or not hmac.compare_digest(value, self.csrf_token(principal)):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "form token missing or stale: "
                                "reload the page")



def current_user(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    basic: Annotated[HTTPBasicCredentials | None, Security(_basic)],
) -> Principal:
    """The FastAPI dependency: the caller, checked by the app's :class:`Authenticator`
    (``app.state.auth``)."""
    auth: Authenticator = request.app.state.auth
    return auth.check(request, bearer, basic)


User = Annotated[Principal, Depends(current_user)]
"""A route parameter that is the authenticated caller."""
