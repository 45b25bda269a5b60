"""The simulated providers' fixed test credentials and how each provider checks them.

Kling verifies its JWT like the real API (HS256 with the secret key, `iss` = access key), but
checks `exp` and `nbf` against the simulator's own clock, so a `FakeClock` test can expire a
token by moving time. The others compare a Bearer key. Each check returns None when the
request may pass, or the (code, message) the provider answers with.
"""

from __future__ import annotations

import hmac
from datetime import datetime

import jwt

KLING_ACCESS_KEY = "sim-kling-access-key"
# At least 32 bytes: PyJWT warns about shorter HMAC keys, and tests turn warnings into errors.
KLING_SECRET_KEY = "sim-kling-secret-key-0123456789abcdef"
BEARER_KEYS = {
    "cometapi": "sim-cometapi-key",
    "gateway": "sim-gateway-key",
    "acedata": "sim-acedata-token",
    "kie": "sim-kie-key",
}


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token if scheme == "Bearer" and token else None


def check_bearer(provider: str, header: str | None) -> str | None:
    """None when the key is right; otherwise "missing" or "invalid"."""
    token = bearer_token(header)
    if token is None:
        return "missing" if not header else "invalid"
    if hmac.compare_digest(token.encode(), BEARER_KEYS[provider].encode()):
        return None
    return "invalid"


def check_kling_jwt(header: str | None, now: datetime) -> tuple[int, str] | None:
    """Kling's 1000-1004 auth codes: generic, empty, invalid, not yet valid, expired."""
    if not header:
        return 1001, "Authorization is empty"
    token = bearer_token(header)
    if token is None:
        return 1002, "Authorization is invalid: expected 'Bearer <token>'"
    try:
        # Time claims are checked below against the simulator's clock, not the host's.
        claims = jwt.decode(
            token,
            KLING_SECRET_KEY,
            algorithms=["HS256"],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.InvalidTokenError as exc:
        return 1002, f"Authorization is invalid: {exc}"
    if claims.get("iss") != KLING_ACCESS_KEY:
        return 1002, "Authorization is invalid: unknown access key"
    exp, nbf = _number(claims.get("exp")), _number(claims.get("nbf", 0))
    if exp is None or nbf is None:
        return 1000, "Authorization failed: exp and nbf must be numbers"
    timestamp = now.timestamp()
    if timestamp < nbf:
        return 1003, "Authorization is not yet valid"
    if timestamp >= exp:
        return 1004, "Authorization has expired"
    return None


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
