"""``ApiError``: a failure that the emulator answers with a Kubernetes ``Status`` object (pure).

Messages, reasons and ``details`` follow what kube-apiserver sends, because clients match on
them (``reason == "AlreadyExists"``, ``code == 410`` in watch ``ERROR`` events, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ApiError",
    "Cause",
    "already_exists",
    "bad_request",
    "conflict",
    "expired",
    "internal_error",
    "invalid",
    "not_found",
    "status_success",
]


@dataclass(frozen=True)
class Cause:
    """One field problem of a 422 ``Invalid``; ``kind`` is e.g. "Required value"."""

    field: str
    kind: str
    detail: str = ""

    _REASONS = {
        "Required value": "FieldValueRequired",
        "Invalid value": "FieldValueInvalid",
        "Forbidden": "FieldValueForbidden",
        "Not found": "FieldValueNotFound",
        "Unsupported value": "FieldValueNotSupported",
        "Duplicate value": "FieldValueDuplicate",
        "Too long": "FieldValueTooLong",
    }

    def message(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind

    def to_json(self) -> dict[str, str]:
        return {
            "reason": self._REASONS.get(self.kind, "FieldValueInvalid"),
            "message": self.message(),
            "field": self.field,
        }

    def __str__(self) -> str:
        return f"{self.field}: {self.message()}"


@dataclass(eq=False)
class ApiError(Exception):
    code: int
    reason: str
    message: str
    details: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(plural: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{plural} "{name}" not found', {"name": name, "kind": plural})


def already_exists(plural: str, name: str) -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{plural} "{name}" already exists', {"name": name, "kind": plural}
    )


def conflict(plural: str, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {plural} "{name}": {why}',
        {"name": name, "kind": plural},
    )


def invalid(kind: str, name: str, causes: list[Cause]) -> ApiError:
    text = str(causes[0]) if len(causes) == 1 else "[" + ", ".join(map(str, causes)) + "]"
    return ApiError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {text}',
        {"name": name, "kind": kind, "causes": [c.to_json() for c in causes]},
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def internal_error(message: str) -> ApiError:
    return ApiError(500, "InternalError", f"Internal error occurred: {message}")


def status_success(plural: str, name: str, uid: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": plural}
    if uid:
        details["uid"] = uid
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }
