"""The OpenAPI document matches the real routes and is what /openapi.json serves."""
import json
import re

import requests

from tests.support import ROOT

DOC = json.loads((ROOT / "app" / "openapi.json").read_text())


def _flask_routes(app) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((method.lower(), path))
    return routes


def _doc_routes() -> set[tuple[str, str]]:
    return {(method, path) for path, ops in DOC["paths"].items() for method in ops
            if method in ("get", "post", "put", "patch", "delete")}


def test_every_route_is_documented_and_every_documented_route_exists(app_factory):
    app = app_factory()
    assert _flask_routes(app) == _doc_routes()


def test_served_document_is_the_repository_file(service):
    r = requests.get(service.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.json() == DOC
