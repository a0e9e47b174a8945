"""Errors of the store, mapped by the REST service to HTTP statuses."""

from __future__ import annotations


class StoreError(Exception):
    """Base class; `code` is the machine-readable error code of the REST error body."""

    code = "error"
    status_code = 400


class NotFoundError(StoreError):
    code = "not_found"
    status_code = 404


class ConflictError(StoreError):
    code = "conflict"
    status_code = 409


class InvalidError(StoreError, ValueError):
    code = "invalid"
    status_code = 422


class ForbiddenError(StoreError):
    """The token is valid but its scope does not allow this (HTTP 403)."""

    code = "forbidden"
    status_code = 403
