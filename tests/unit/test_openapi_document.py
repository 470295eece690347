"""app/openapi.json is valid OpenAPI 3 and declares its error statuses."""
import json

from openapi_spec_validator import validate

from tests.support import ROOT

DOC = json.loads((ROOT / "app" / "openapi.json").read_text())


def test_document_is_valid_openapi_3():
    assert DOC["openapi"].startswith("3.")
    validate(DOC)


def test_every_operation_declares_its_error_statuses():
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            if path.startswith("/api/v1"):
                assert "401" in op["responses"], (method, path)
                assert "429" in op["responses"], (method, path)
