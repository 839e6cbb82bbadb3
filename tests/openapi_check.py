"""Validate every response the tests receive against the checked-in docs/openapi.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema

DOC = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())
ROUTES = [
    (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path)
    for path in sorted(DOC["paths"], key=len, reverse=True)
]
checked: list[str] = []


def schema_for(method: str, url_path: str, status: int, content_type: str) -> dict[str, Any] | None:
    for pattern, template in ROUTES:
        if pattern.match(url_path):
            operation = DOC["paths"][template].get(method.lower())
            assert operation is not None, f"{method} {template} is not in the OpenAPI document"
            responses = operation["responses"]
            response = responses.get(str(status))
            assert response is not None, (
                f"{method} {template} answered {status}, which is not documented"
            )
            media = response.get("content", {}).get(content_type.split(";")[0].strip())
            return None if media is None else media.get("schema")
    raise AssertionError(f"{method} {url_path} is not in the OpenAPI document")


def validate(response: httpx.Response) -> None:
    """An httpx response hook: the status must be documented, and a JSON body must match."""
    request = response.request
    content_type = response.headers.get("content-type", "")
    schema = schema_for(request.method, request.url.path, response.status_code, content_type)
    if schema and content_type.startswith("application/json"):
        response.read()
        jsonschema.validate(response.json(), {**schema, "components": DOC["components"]})
    checked.append(f"{request.method} {request.url.path} {response.status_code}")
