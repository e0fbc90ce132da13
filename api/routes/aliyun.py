"""Aliyun's receipt pushes: call results, keypresses, SMS delivery reports and replies (docs/contract.md,
"Aliyun receipts").

Aliyun signs no push. It posts JSON arrays to the URLs set in its console, so each
URL carries an unguessable token, ``SHOUHU_ALIYUN_CALLBACK_TOKEN``, compared in
constant time; a wrong one (or any push while none is set) is answered 404, audited,
and nothing else is read or written. Each item is then believed only when it names
what Shouhu sent (``alerts/aliyun_receipts.py``).

The route answers within the provider's deadline because it does no work beyond
validating and storing: each item goes into the receipt queue
(``alerts/receipts.py``), keyed so that a retried push stores nothing new, and a
worker of the API process does the rest. An item that does not validate is kept as
a dead letter and named in a 422, the others of its batch queued all the same:
nothing a push carries is lost, and the provider's console shows the bad field.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from alerts.aliyun_receipts import PROVIDER, ReceiptKind, new_receipt, validate_item
from alerts.receipts import NewReceipt, audit_refused, dead_letter, store
from api.deps import ConnDep, Now, SettingsDep, tuple_rows
from api.limits import storable_text

log = logging.getLogger(__name__)

ALIYUN_CALLBACK_PREFIX = "/callbacks/aliyun/"
PATH = ALIYUN_CALLBACK_PREFIX + "{token}/"

router = APIRouter(tags=["callbacks"])

RESPONSES: dict[int | str, dict[str, Any]] = {
    status.HTTP_404_NOT_FOUND: {"description": "Wrong token, or SHOUHU_ALIYUN_CALLBACK_TOKEN is not set (audited)."},
    status.HTTP_422_UNPROCESSABLE_CONTENT: {
        "description": "Not a JSON array, or an item without a field Aliyun documents (named); the valid items "
        "are queued all the same and the invalid ones dead-lettered."
    },
}


class ReceiptAnswer(BaseModel):
    """The answer Aliyun expects: it checks only that ``code`` is a number, and the 200."""

    code: int = 0
    msg: str = "接收成功"


def _kind(request: Request) -> ReceiptKind:
    return ReceiptKind(request.url.path.rsplit("/", 1)[-1])


def check_token(token: str, request: Request, conn: ConnDep, now: Now, settings: SettingsDep) -> ReceiptKind:
    """The push's kind, once the token in its URL is the configured one; 404 (audited) otherwise."""
    expected = settings.aliyun_callback_token
    kind = _kind(request)
    if expected and hmac.compare_digest(token.encode(), expected.encode()):
        return kind
    reason = "wrong token" if expected else "no SHOUHU_ALIYUN_CALLBACK_TOKEN is configured"
    log.warning("refused an aliyun %s push from %s: %s", kind, request.client.host if request.client else "?", reason)
    with conn.transaction(), tuple_rows(conn) as plain:
        detail = {"kind": kind.value, "client": request.client.host if request.client else None}
        audit_refused(plain, now, PROVIDER, f"callback:aliyun/{kind.value}", reason, detail)
    raise HTTPException(status.HTTP_404_NOT_FOUND, "Not Found")


Kind = Annotated[ReceiptKind, Depends(check_token)]


async def read_items(kind: Kind, request: Request) -> list[Any]:
    """The push's JSON array, read only once the token is right (a prober learns nothing from a body)."""
    try:
        items = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise _invalid_body(f"not JSON: Aliyun's {kind} push is a JSON array", "json_invalid") from None
    if not isinstance(items, list):
        raise _invalid_body(f"not a JSON array: Aliyun's {kind} push is a batch of items", "list_type")
    return items


def _invalid_body(message: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body",), "msg": message, "type": kind}])


Items = Annotated[list[Any], Depends(read_items)]
# The body as the OpenAPI document gives it (read by read_items, not by FastAPI).
BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}},
        "description": "Aliyun's push: a JSON array of items, the fields as Aliyun documents them.",
    }
}


def _clean(value: Any) -> Any:
    """``value`` with text PostgreSQL cannot store dropped (the request limits let these bodies through)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list):
        return [_clean(item) for item in value]
    if isinstance(value, dict):
        return {storable_text(str(key)): _clean(item) for key, item in value.items()}
    return value


def receive_push(kind: Kind, items: Items, conn: ConnDep, now: Now) -> ReceiptAnswer:
    """Queue every valid item of a push, dead-letter the others; 422 naming their fields if any."""
    valid: list[NewReceipt] = []
    invalid: list[tuple[Any, ValidationError]] = []
    errors: list[dict[str, Any]] = []
    for index, raw in enumerate(_clean(items)):
        try:
            item = validate_item(kind, raw)
        except ValidationError as exc:
            invalid.append((raw, exc))
            errors.extend({**e, "loc": ("body", index, *e["loc"])} for e in exc.errors(include_url=False))
            continue
        valid.append(new_receipt(kind, item, raw))
    with conn.transaction(), tuple_rows(conn) as plain:
        new = store(plain, PROVIDER, valid, now)
        for raw, problem in invalid:
            dead_letter(plain, PROVIDER, kind.value, raw, str(problem), now)
    log.info("aliyun %s push: %s items, %s new, %s malformed", kind, len(items), new, len(invalid))
    if errors:
        raise RequestValidationError(errors)
    return ReceiptAnswer()


# One route per push, each with its own line in the OpenAPI document.
PUSHES = {
    ReceiptKind.VOICE_REPORT: "VoiceReport: a page call's result (heard, busy, no answer…), queued.",
    ReceiptKind.VOICE_CALL_REPORT: "VoiceCallReport: a page call's progress and its keys "
    "(``300000``, ``dtmf``: 1 takes, 2 declines), queued.",
    ReceiptKind.SMS_REPORT: "SmsReport: an SMS page delivered, or failed with Aliyun's ``err_code``, queued.",
    ReceiptKind.SMS_UP: "SmsUp: an SMS reply, ``CODE 1`` or ``CODE 2``, queued.",
}
for _push, _description in PUSHES.items():
    router.add_api_route(
        PATH + _push,
        receive_push,
        methods=["POST"],
        name=f"receive_{_push}",
        summary=f"Receive Aliyun's {_push}",
        description=_description,
        responses=RESPONSES,
        openapi_extra=BODY,
    )


class RedactToken(logging.Filter):
    """Keeps the token out of the access log: uvicorn logs each request's path, and the token is in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and ALIYUN_CALLBACK_PREFIX in arg for arg in record.args
        ):
            record.args = tuple(_redacted(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def _redacted(text: str) -> str:
    head, found, rest = text.partition(ALIYUN_CALLBACK_PREFIX)
    if not found:
        return text
    _token, slash, tail = rest.partition("/")
    return head + ALIYUN_CALLBACK_PREFIX + "***" + slash + tail


def redact_access_log() -> None:
    """Install :class:`RedactToken` on uvicorn's access log, once."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactToken) for f in access.filters):
        access.addFilter(RedactToken())
