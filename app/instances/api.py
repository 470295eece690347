"""Instances API (SPEC 4.4): create, list, read, update, delete; secrets always masked."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from app.web.auth import audit, guard
from app.web.errors import ApiError
from app.instances import DuplicateInstance, InvalidInstance, public, validate
from app.telemetry.logs import REDACTOR
from app.runtime import runtime

bp = Blueprint("instances", __name__, url_prefix="/api/v1/instances")


@bp.before_request
def _auth() -> None:
    guard().require_api_key()


def _repo():
    return runtime().instances


def _body() -> object:
    if request.mimetype != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "body is not valid JSON")
    return body


def _validated(body: object, partial: bool) -> dict:
    try:
        fields = validate(body, partial=partial)
    except InvalidInstance as exc:
        raise ApiError(400, str(exc), {"field": exc.field}) from None
    REDACTOR.add(*(fields.get(k) for k in ("agent_api_key", "evolution_api_key", "webhook_secret")))
    return fields


def _missing(name: str) -> ApiError:
    return ApiError(404, f"instance {name[:64]!r} not found")


@bp.post("")
def create_instance():
    """Create an instance."""
    fields = _validated(_body(), partial=False)
    try:
        row = _repo().create(fields)
    except DuplicateInstance:
        raise ApiError(409, f"instance {fields['name']!r} already exists") from None
    audit("create_instance", instance=row["name"])
    return jsonify(public(row)), 201


@bp.get("")
def list_instances():
    """Every instance."""
    audit("list_instances")
    return jsonify([public(r) for r in _repo().list()])


@bp.get("/<name>")
def get_instance(name: str):
    """One instance."""
    row = _repo().get(name)
    if row is None:
        raise _missing(name)
    audit("get_instance", instance=name)
    return jsonify(public(row))


@bp.patch("/<name>")
def update_instance(name: str):
    """Change some fields of an instance."""
    fields = _validated(_body(), partial=True)
    row = _repo().update(name, fields)
    if row is None:
        raise _missing(name)
    audit("update_instance", instance=name, fields=sorted(fields))
    return jsonify(public(row))


@bp.delete("/<name>")
def delete_instance(name: str):
    """Remove an instance (its traces stay until retention removes them)."""
    if not _repo().delete(name):
        raise _missing(name)
    audit("delete_instance", instance=name)
    return "", 204
