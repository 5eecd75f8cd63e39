"""Webhook signatures: HubSpot's v3 and Standard Webhooks, signed by senders, verified by the inbox.

- HubSpot v3: `X-HubSpot-Signature-v3` = base64(HMAC-SHA256(client secret, method + uri + body +
  timestamp)), `X-HubSpot-Request-Timestamp` in milliseconds.
- Standard Webhooks: `webhook-signature` = space-separated `v1,<base64>` signatures, each
  HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"` with the key a `whsec_<base64>`
  secret decodes to; `webhook-timestamp` in seconds.

Both refuse a timestamp more than `TOLERANCE` away from now (a captured request cannot be sent
again later) and compare in constant time. Several secrets are tried (key rotation: the new and
the old one are both valid for a while), and several Standard Webhooks signatures are accepted.
Secrets never appear in errors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TOLERANCE_SECONDS = 300
STANDARD_PREFIX = "whsec_"
# HubSpot signs the URI with these escapes decoded (its v3 validation guide lists them).
_HUBSPOT_DECODED = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)


def hubspot_uri(uri: str) -> str:
    """The URI as HubSpot's v3 signature covers it."""
    return _HUBSPOT_DECODED.sub(lambda match: chr(int(match.group(1), 16)), uri)


class SignatureRefused(Exception):
    """The request is not proven to come from the CRM; the message says why (never a secret)."""


@dataclass(frozen=True)
class Verified:
    """A request whose signature holds: its scheme and the id that makes a replay recognisable."""

    scheme: str
    delivery_id: str


def parse_secrets(text: str | None) -> list[str]:
    """`CRM_WEBHOOK_SECRET`: one secret, or several separated by spaces or commas (rotation)."""
    return [part for part in (text or "").replace(",", " ").split() if part]


def _standard_key(secret: str) -> bytes | None:
    if not secret.startswith(STANDARD_PREFIX):
        return None
    try:
        return base64.b64decode(secret[len(STANDARD_PREFIX) :], validate=True)
    except binascii.Error:
        return None


def _hmac_b64(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


# --- senders ---------------------------------------------------------------------------------


def hubspot_headers(secret: str, method: str, uri: str, body: bytes, now: float | None = None):
    """The headers HubSpot's v3 signature puts on a request to `uri`."""
    timestamp = str(int((time.time() if now is None else now) * 1000))
    message = method.upper().encode() + hubspot_uri(uri).encode() + body + timestamp.encode()
    return {
        "X-HubSpot-Signature-v3": _hmac_b64(secret.encode(), message),
        "X-HubSpot-Request-Timestamp": timestamp,
    }


def standard_headers(
    secrets: Sequence[str], webhook_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """Standard Webhooks headers, signed with each of `secrets` (`whsec_…`) during a rotation."""
    timestamp = str(int(time.time() if now is None else now))
    message = f"{webhook_id}.{timestamp}.".encode() + body
    signatures = []
    for secret in secrets:
        key = _standard_key(secret)
        if key is None:
            raise ValueError("a Standard Webhooks secret is 'whsec_' followed by base64")
        signatures.append(f"v1,{_hmac_b64(key, message)}")
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": " ".join(signatures),
    }


# --- the receiver ----------------------------------------------------------------------------


def _fresh(timestamp_seconds: float, now: float, what: str) -> None:
    if abs(now - timestamp_seconds) > TOLERANCE_SECONDS:
        raise SignatureRefused(
            f"{what} is more than {TOLERANCE_SECONDS // 60} minutes from the server's clock: "
            "a stale or replayed request"
        )


def _number(value: str | None, what: str) -> int:
    if not value or not value.strip().isdecimal():
        raise SignatureRefused(f"{what} is missing or not a whole number")
    return int(value.strip())


def verify(
    secrets: Sequence[str],
    method: str,
    uri: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
) -> Verified:
    """Which scheme signed this request, with which delivery id; `SignatureRefused` otherwise.

    `headers` must look names up ignoring case (an `http.client.HTTPMessage` does). `uri` is the
    URL as the sender called it (HubSpot signs it): scheme, host, path and query.
    """
    now = time.time() if now is None else now
    if not secrets:
        raise SignatureRefused("no signing secret is configured (CRM_WEBHOOK_SECRET)")
    if headers.get("webhook-signature") is not None:
        return _verify_standard(secrets, headers, body, now)
    if headers.get("X-HubSpot-Signature-v3") is not None:
        return _verify_hubspot(secrets, method, uri, headers, body, now)
    raise SignatureRefused(
        "unsigned: send X-HubSpot-Signature-v3 (HubSpot) or webhook-signature (Standard Webhooks)"
    )


def _verify_standard(secrets, headers, body: bytes, now: float) -> Verified:
    webhook_id = (headers.get("webhook-id") or "").strip()
    if not webhook_id or len(webhook_id) > 200:
        raise SignatureRefused("webhook-id is missing or longer than 200 characters")
    timestamp = _number(headers.get("webhook-timestamp"), "webhook-timestamp")
    _fresh(timestamp, now, "webhook-timestamp")
    message = f"{webhook_id}.{timestamp}.".encode() + body
    offered = [
        part.split(",", 1)[1].encode()
        for part in headers.get("webhook-signature", "").split()
        if part.startswith("v1,")
    ]
    keys = [key for key in map(_standard_key, secrets) if key is not None]
    if not keys:
        raise SignatureRefused("no Standard Webhooks secret (whsec_…) is configured")
    expected = [_hmac_b64(key, message).encode() for key in keys]
    # Every pair is compared, so the time taken says nothing about which one matched.
    matched = [hmac.compare_digest(e, o) for e in expected for o in offered]
    if not any(matched):
        raise SignatureRefused("webhook-signature matches none of the configured secrets")
    return Verified("standard-webhooks", f"standard:{webhook_id}")


def _verify_hubspot(secrets, method: str, uri: str, headers, body: bytes, now: float) -> Verified:
    timestamp = _number(headers.get("X-HubSpot-Request-Timestamp"), "X-HubSpot-Request-Timestamp")
    _fresh(timestamp / 1000, now, "X-HubSpot-Request-Timestamp")
    offered = headers.get("X-HubSpot-Signature-v3", "").strip().encode()
    signed_uri = hubspot_uri(uri).encode()
    message = method.upper().encode() + signed_uri + body + str(timestamp).encode()
    matched = [
        hmac.compare_digest(_hmac_b64(secret.encode(), message).encode(), offered)
        for secret in secrets
    ]
    if not any(matched):
        raise SignatureRefused("X-HubSpot-Signature-v3 matches none of the configured secrets")
    # HubSpot sends no delivery id: a replay repeats the signed (timestamp, signature) exactly.
    digest = hashlib.sha256(f"{timestamp}.".encode() + offered).hexdigest()
    return Verified("hubspot-v3", f"hubspot:{digest}")
