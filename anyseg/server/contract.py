"""The API's contract: the OpenAPI document says exactly what the server answers, for every route.

:func:`install_contract` is called once by :func:`~anyseg.server.app.create_app` and applies to every
route under ``/api/v1``, those registered after it included:

* **Error answers are declared**, each with the :class:`~anyseg.server.schemas.ErrorResponse` body
  (``application/json``). Some follow from the route itself: 400 (invalid request) on a route with
  parameters or a body, 404 (unknown id) on a route with a path parameter, 413 (body too large) on a
  route with a body, and 401 (missing or wrong token) on a route that needs the token, only when the
  server has one. Others a route names with ``responses=errors(404, 409)``. FastAPI's 422 is dropped:
  this server answers invalid requests with 400.
* **Security is declared only when it is enforced**: without a token the document has no security
  scheme and no operation requires one.
* **Success media types are exact**: a route whose success answer is declared with another media type
  (PNG, octet-stream, NDJSON) loses FastAPI's default ``application/json`` entry.
* **Methods follow the document**: a request under ``/api/v1`` whose path is one of the document's
  but whose method is not gets 405 with ``Allow`` listing exactly the document's methods for that
  path. HEAD, OPTIONS and TRACE are not served (FastAPI routes answer only the methods they name), so
  they are neither in the document nor in ``Allow``. A path matches its concrete entry before a
  templated one (``/images/from-file`` before ``/images/{image_id}``), as in OpenAPI. A percent-encoded
  ``/`` inside a path segment is answered 404: no id contains one.
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

API = "/api/v1"

#: Descriptions of the error answers this API uses.
ERROR_DESCRIPTIONS: Dict[int, str] = {
    400: "invalid request: a parameter, body, image or prompt the server cannot use",
    401: "missing or wrong bearer token",
    404: "unknown id, file or resource",
    405: "method not allowed on this path",
    409: "the resource is busy with another request",
    413: "request body too large",
    429: "too many open resources",
}

#: Order of methods in ``Allow`` headers.
METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
_OPERATION_KEYS = {m.lower() for m in METHOD_ORDER}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def errors(*codes: int, **notes: str) -> Dict[int, Dict[str, Any]]:
    """``responses=`` for a route's error answers, each with the error body.

    ``errors(404, 409)``; a route-specific description replaces the generic one with a keyword named
    after the code: ``errors(404, e404="no such annotation")``."""
    from .schemas import ErrorResponse

    out: Dict[int, Dict[str, Any]] = {}
    for code in codes:
        text = notes.get(f"e{code}") or ERROR_DESCRIPTIONS.get(code) or HTTPStatus(code).phrase
        out[int(code)] = {"model": ErrorResponse, "description": text}
    return out


# ------------------------------------------------------------------------------------- the document
def _error_response(code: int) -> Dict[str, Any]:
    return {"description": ERROR_DESCRIPTIONS.get(code) or HTTPStatus(code).phrase,
            "content": {"application/json": {"schema": dict(_ERROR_REF)}}}


def finish_openapi(schema: Dict[str, Any], *, token: bool, prefix: str = API) -> Dict[str, Any]:
    """Apply the contract's rules (see the module doc) to FastAPI's document, in place; returns it."""
    for path, item in schema.get("paths", {}).items():
        if not path.startswith(prefix):
            continue
        for method in [m for m in item if m in _OPERATION_KEYS]:
            _finish_operation(item[method], token=token)
    components = schema.setdefault("components", {})
    if "ErrorResponse" in json.dumps(schema.get("paths", {})):
        from .schemas import ErrorResponse

        components.setdefault("schemas", {}).setdefault(
            "ErrorResponse", ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"))
    if not token:
        components.pop("securitySchemes", None)
    _drop_unused_schemas(schema, ("HTTPValidationError", "ValidationError"))
    return schema


def _finish_operation(op: Dict[str, Any], *, token: bool) -> None:
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    params = op.get("parameters") or []
    if params or "requestBody" in op:
        responses.setdefault("400", _error_response(400))
    if any(p.get("in") == "path" for p in params):
        responses.setdefault("404", _error_response(404))
    if "requestBody" in op:
        responses.setdefault("413", _error_response(413))
    if op.get("security"):
        if token:
            responses.setdefault("401", _error_response(401))
        else:
            del op["security"]
    for code, response in responses.items():
        if code.startswith(("4", "5")):
            content = response.setdefault("content", {})
            if not content:
                content["application/json"] = {"schema": dict(_ERROR_REF)}
        elif code.startswith("2"):
            content = response.get("content") or {}
            default = content.get("application/json")
            if len(content) > 1 and default is not None and not default.get("schema"):
                del content["application/json"]  # FastAPI's default entry next to the real media type


def _drop_unused_schemas(schema: Dict[str, Any], names: Iterable[str]) -> None:
    schemas = schema.get("components", {}).get("schemas", {})
    text = json.dumps(schema.get("paths", {}))
    for name in names:
        if name in schemas and f"#/components/schemas/{name}\"" not in text:
            others = json.dumps({k: v for k, v in schemas.items() if k != name})
            if f"#/components/schemas/{name}\"" not in others:
                del schemas[name]


# ------------------------------------------------------------------------------------------ methods
class _PathTable:
    """The document's paths under the API prefix, matched as OpenAPI matches them."""

    def __init__(self, schema: Dict[str, Any], prefix: str) -> None:
        self.entries: List[Tuple[re.Pattern, int, Tuple[str, ...]]] = []
        for path, item in schema.get("paths", {}).items():
            if not path.startswith(prefix):
                continue
            methods = tuple(m for m in METHOD_ORDER if m.lower() in item)
            pattern = re.compile("^" + "".join(
                "[^/]+" if part.startswith("{") else re.escape(part)
                for part in re.split(r"(\{[^}/]+\})", path)) + "$")
            self.entries.append((pattern, path.count("{"), methods))

    def methods(self, path: str) -> Optional[Tuple[str, ...]]:
        """The methods of the document's entry for ``path`` (None: no entry).

        Concrete entries come before templated ones; among equally templated ones, the union."""
        found = [(params, methods) for pattern, params, methods in self.entries if pattern.match(path)]
        if not found:
            return None
        fewest = min(params for params, _ in found)
        allowed = {m for params, methods in found if params == fewest for m in methods}
        return tuple(m for m in METHOD_ORDER if m in allowed)


class MethodContractMiddleware:
    """405 with the document's ``Allow`` for a method the document does not have on a path it has."""

    def __init__(self, app, openapi: Callable[[], Dict[str, Any]], prefix: str = API) -> None:
        self.app = app
        self.openapi = openapi
        self.prefix = prefix
        self._table: Optional[_PathTable] = None

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(self.prefix + "/"):
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path") or b""
        if b"%2f" in raw.lower():
            await _send_json(send, 404, {"detail": "no such resource: an id never contains '/'"})
            return
        if self._table is None:
            self._table = _PathTable(self.openapi(), self.prefix)
        allowed = self._table.methods(path)
        method = scope.get("method", "GET").upper()
        if allowed is None or method in allowed:
            await self.app(scope, receive, send)
            return
        await _send_json(send, 405, {"detail": f"method {method} is not allowed on {path}; allowed: "
                                               f"{', '.join(allowed)}"},
                         [(b"allow", ", ".join(allowed).encode())], body=method != "HEAD")


async def _send_json(send, status: int, payload: Any, headers: Optional[list] = None, body: bool = True) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data if body else b""})


def install_contract(app, *, token: bool, prefix: str = API) -> None:
    """Make ``app``'s OpenAPI document follow the contract and its answers follow the document.

    Call it once, before the app serves (routes may still be added afterwards: the document is built
    on first use)."""
    fastapi_openapi = app.openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish_openapi(fastapi_openapi(), token=token, prefix=prefix)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(MethodContractMiddleware, openapi=openapi, prefix=prefix)
