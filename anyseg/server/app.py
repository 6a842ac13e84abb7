"""The FastAPI application: the HTTP API under ``/api/v1`` and the browser app at ``/``.

Build it with :func:`create_app` from a loaded model and :class:`~anyseg.server.settings.ServerSettings`;
``anyseg serve`` runs it with uvicorn. The OpenAPI document is at ``/api/v1/openapi.json`` and the
interactive docs at ``/api/v1/docs``.

Errors are JSON ``{"detail": ...}``: 400 for a bad image, prompt or body (never a traceback), 401 for a
missing or wrong token, 404 for an unknown image id / file / annotation, 413 for a body over the
limit, 500 with a generic message for anything unexpected (logged on the server). The OpenAPI document
declares each route's answers exactly (see :mod:`anyseg.server.contract`); a route names the error
answers that do not follow from its parameters with ``responses=errors(...)``.
"""
import logging
import secrets
from pathlib import Path
from typing import Any, Optional

from .settings import ServerSettings

log = logging.getLogger("anyseg.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
API = "/api/v1"


def _require_fastapi():
    try:
        import fastapi  # noqa: F401

        try:
            import python_multipart  # noqa: F401  (uploads)
        except ImportError:
            import multipart  # noqa: F401  (python-multipart before 0.0.13)
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            f"the anyseg server needs FastAPI, uvicorn and python-multipart ({exc}); "
            "install them with: pip install 'anyseg[server]'"
        ) from exc


class BodyLimitMiddleware:
    """Answers 413 to requests whose body is larger than ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await _send_json(send, 413, {"detail": f"request body too large: at most {self.max_bytes} bytes"})
                return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"detail": f"request body too large: at most {self.max_bytes} bytes"})


class _BodyTooLarge(Exception):
    pass


async def _send_json(send, status: int, payload: Any) -> None:
    import json

    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(model, settings: Optional[ServerSettings] = None, *, concept_model=None,
               concept_model_name: str = "sam3"):
    """The ASGI app serving ``model`` (a SAM 1 or SAM 2 model from :func:`anyseg.load_model`) with ``settings``.

    ``concept_model``: a SAM 3 model that answers concept prompts (``POST /images/{id}/concept``: every
    instance of a phrase) next to ``model``, which decodes clicks; ``concept_model_name`` names it in
    the answers."""
    _require_fastapi()
    from ..protocol import model_family

    if model_family(model) == "sam3":
        raise ValueError("a SAM 3 model answers concept prompts next to a SAM 1 / SAM 2 model that decodes clicks: "
                         "serve e.g. --model vit_b --concept-model sam3")
    if concept_model is not None and model_family(concept_model) != "sam3":
        raise ValueError(f"the concept model must be a SAM 3 model, got a {model_family(concept_model)} model")
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__
    from .annotations import AnnotationStore
    from .cache import EmbeddingCache
    from .engine import Engine
    from .page_decoder import DECODER_OPSET, DecoderExport
    from .contract import errors, install_contract
    from .files import IMAGE_MEDIA_TYPES, ImageFolder, OutsideFolderError, media_type
    from .schemas import DecoderInfo, FileEncodeRequest, FileList, Health, ImageInfo

    settings = settings or ServerSettings()
    engine = Engine(model, EmbeddingCache(settings.cache_bytes), max_pixels=settings.max_pixels,
                    model_name=settings.model_name)
    store = AnnotationStore(settings.annotations_path, images_dir=settings.images_dir)
    folder = ImageFolder(settings.images_dir) if settings.images_dir is not None else None

    def make_decoder(served) -> DecoderExport:
        """The page's decoder graphs of model ``served`` (a new one on every model switch)."""
        return DecoderExport(served, settings.decoder_dir, enabled=settings.browser_decoder,
                             graph=settings.page_graph)

    decoder = make_decoder(model)

    app = FastAPI(
        title="anyseg", version=__version__,
        description="Segment Anything over HTTP: encode images, decode point / box prompts into masks, "
                    "segment everything, and keep labelled objects as COCO JSON. Coordinates are pixels "
                    "of the original image, X right, Y down.",
        openapi_url=f"{API}/openapi.json", docs_url=f"{API}/docs", redoc_url=None,
    )
    app.state.settings, app.state.engine, app.state.store = settings, engine, store
    app.state.decoder, app.state.folder = decoder, folder
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    install_contract(app, token=settings.token is not None, prefix=API)

    # -------------------------------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"detail": f"invalid request: {summary}", "errors": errors}, status_code=400)

    @app.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error (see the server log)"}, status_code=500)

    # ---------------------------------------------------------------------------------------- auth
    bearer = HTTPBearer(auto_error=False, description="the --token given to anyseg serve")

    def require_token(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    app.state.require_token = require_token
    auth = [Depends(require_token)]

    # ------------------------------------------------------------------------------- server state
    @app.get(f"{API}/health", response_model=Health, tags=["server"], summary="liveness and cache state")
    def health():
        decoder = app.state.decoder
        return Health(status="ok", model=engine.model_name, device=str(engine.model.device),
                      cache=engine.cache.stats(), encodes=engine.encodes, decoder=decoder.status,
                      annotations_file=str(settings.annotations_path) if settings.annotations_path else None,
                      images_dir=folder is not None, auth=settings.token is not None)

    @app.get(f"{API}/decoder", response_model=DecoderInfo, tags=["browser decoder"], dependencies=auth,
             summary="whether the page can decode prompts itself")
    def decoder_info():
        decoder, model = app.state.decoder, engine.model  # both change together on a model switch
        runtime = STATIC_DIR / "ort" / "ort.wasm.min.mjs"
        return DecoderInfo(
            status=decoder.status, reason=decoder.reason, opset=DECODER_OPSET,
            url=f"{API}/decoder.onnx" if decoder.status == "ready" else None,
            cache_url=f"{API}/decoder-cache.onnx" if decoder.status == "ready" else None,
            nomask_url=f"{API}/decoder-nomask.onnx" if decoder.status == "ready" else None,
            runtime_url="/static/ort/ort.wasm.min.mjs" if runtime.is_file() else None,
            img_size=int(model.img_size), mask_side=int(engine.mask_input_size), graph=decoder.graph,
            **decoder.describe(model),
        )

    def _graph_file(which: str, filename: str) -> FileResponse:
        decoder = app.state.decoder
        path = getattr(decoder, which)
        if decoder.status != "ready" or path is None:
            raise HTTPException(404, f"the decoder graph is not available: {decoder.reason}")
        return FileResponse(path, media_type="application/octet-stream", filename=filename)

    onnx_file = {200: {"content": {"application/octet-stream": {}}},
                 **errors(404, e404="the graph is not available (being exported, or the browser decoder is off)")}

    @app.get(f"{API}/decoder.onnx", tags=["browser decoder"], dependencies=auth,
             summary="the exported mask decoder graph (ONNX)", response_class=FileResponse, responses=onnx_file)
    def decoder_graph():
        return _graph_file("path", "decoder.onnx")

    @app.get(f"{API}/decoder-cache.onnx", tags=["browser decoder"], dependencies=auth,
             summary="the per-image graph whose outputs the decoder graph takes (ONNX)", response_class=FileResponse,
             responses=onnx_file)
    def decoder_cache_graph():
        return _graph_file("cache_path", "decoder-cache.onnx")

    @app.get(f"{API}/decoder-nomask.onnx", tags=["browser decoder"], dependencies=auth,
             summary="the decoder graph for prompts without a mask prompt (ONNX)", response_class=FileResponse,
             responses=onnx_file)
    def decoder_nomask_graph():
        return _graph_file("nomask_path", "decoder-nomask.onnx")

    # ------------------------------------------------------------------------------------- folder
    def _folder() -> ImageFolder:
        if folder is None:
            raise HTTPException(404, "this server was started without --images: there is no folder to browse")
        return folder

    no_folder = "the server was started without --images"

    @app.get(f"{API}/files", response_model=FileList, tags=["folder"], dependencies=auth,
             summary="images in the served folder", responses=errors(404, e404=no_folder))
    def list_files():
        return FileList(files=_folder().list())

    @app.get(f"{API}/files/raw", tags=["folder"], dependencies=auth, response_class=FileResponse,
             summary="the bytes of one image of the served folder",
             responses={200: {"content": {t: {} for t in sorted(set(IMAGE_MEDIA_TYPES.values()))}},
                        **errors(404, e404=f"no such image in the served folder, or {no_folder}")})
    def raw_file(path: str):
        try:
            target = _folder().resolve(path)
        except OutsideFolderError as exc:
            raise HTTPException(404, str(exc)) from None
        return FileResponse(target, media_type=media_type(target))

    @app.post(f"{API}/images/from-file", response_model=ImageInfo, tags=["images"], dependencies=auth,
              summary="encode an image of the served folder",
              responses=errors(404, e404=f"no such image in the served folder, or {no_folder}"))
    def encode_file(body: FileEncodeRequest):
        try:
            target = _folder().resolve(body.path)
        except OutsideFolderError as exc:
            raise HTTPException(404, str(exc)) from None
        size = target.stat().st_size
        if size > settings.max_request_bytes:
            raise ValueError(f"'{body.path}' is {size} bytes, more than the {settings.max_request_bytes}-byte limit")
        entry, cached = engine.encode_bytes(target.read_bytes(), body.path)
        return image_info(entry, cached, body.include_embedding)

    from .formats import float32_to_b64

    def image_info(entry, cached: bool, include_embedding: bool) -> ImageInfo:
        return ImageInfo(id=entry.id, name=entry.name, width=entry.original_size[1], height=entry.original_size[0],
                         input_width=entry.input_size[1], input_height=entry.input_size[0],
                         embedding_shape=list(entry.embedding.shape), cached=cached,
                         embedding=float32_to_b64(entry.embedding) if include_embedding else None)

    from .api_annotations import add_annotation_routes
    from .api_images import add_image_routes

    add_image_routes(app, engine, settings, auth, image_info)
    add_annotation_routes(app, engine, store, auth)
    from .api_loop import add_loop_routes
    from .models import ModelCatalog

    catalog = ModelCatalog(settings.model_name, model, settings.models_dir)
    add_loop_routes(app, engine, store, catalog, auth, make_decoder)
    from .api_concept import ConceptFinder, add_concept_routes

    finder = ConceptFinder(concept_model, concept_model_name) if concept_model is not None else None
    app.state.concept = finder
    add_concept_routes(app, engine, store, finder, auth)
    from .api_videos import add_video_routes

    add_video_routes(app, model, engine, settings, auth)

    # ------------------------------------------------------------------------------- browser app
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return HTMLResponse("<p>The browser app is missing from this installation; the API is at "
                                f"<a href='{API}/docs'>{API}/docs</a>.</p>")
        return HTMLResponse(page.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            # Cross-origin isolation lets the page run onnxruntime-web with WebAssembly threads. (Not on
            # the API docs page, whose scripts come from elsewhere.)
            response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
            response.headers.setdefault("Cross-Origin-Embedder-Policy", "require-corp")
            response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        return response

    return app
