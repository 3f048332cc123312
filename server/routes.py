"""HTTP routes. Routes that run the model are plain ``def``: FastAPI runs them in its thread pool,
where frames are decoded in parallel, and they wait on the batch worker without blocking the
event loop. Cheap routes (health, metrics) are ``async``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Request, Security, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import Field
from vvireid.indexer.store import GalleryItem, Hit
from vvireid.model.types import Modality
from vvireid.server import schemas
from vvireid.server.errors import ApiError
from vvireid.server.metrics import CONTENT_TYPE
from vvireid.server.service import (
    FramePayload,
    InvalidFieldError,
    NotReadyError,
    QueryEngine,
    QueryResult,
    QuerySpec,
)

log = logging.getLogger(__name__)
_CAMID_TOKEN = re.compile(r"[0-9]{1,9}")

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="needed by the gallery write endpoints"
)


def _error_docs(**texts: str) -> dict[int | str, dict[str, Any]]:
    return {
        int(status[1:]): {"model": schemas.ErrorResponse, "description": text}
        for status, text in texts.items()
    }


_COMMON_ERRORS = _error_docs(
    s400="malformed request (e.g. a broken multipart body)",
    s408="the request body was not received within body_timeout_s",
    s413="body, frame or the request's decoded pixels over a limit (the error names it)",
    s422="bad frame or field, unknown or repeated field (the error names the part)",
    s500="internal error (the body gives the request id to look up in the server log)",
)
_ERRORS = {
    **_COMMON_ERRORS,
    **_error_docs(
        s503="not ready, or busy: no slot within admission_timeout_s (see Retry-After)",
        s504="the model did not answer within request_timeout_s",
    ),
}
_WRITE_ERRORS = {
    **_ERRORS,
    **_error_docs(
        s401="no X-API-Key header", s403="wrong key, or writes disabled",
        s409="the tracklet id exists, or another process changed the gallery",
    ),
}
_READ_ERRORS = _error_docs(
    s500="internal error (the body gives the request id)",
    s503="model and index not loaded yet",
)

METRICS_AUTH = APIKeyHeader(
    name="Authorization", auto_error=False, scheme_name="MetricsBearer",
    description="'Bearer KEY', needed by /metrics when the server has a metrics_key",
)
router = APIRouter()

FramesField = Annotated[
    list[UploadFile] | None,
    File(description="1..max_frames JPEG/PNG/WebP frames of one tracklet, in temporal order"),
]
ModalityField = Annotated[
    schemas.ModalityInput,
    Form(description="modality of the frames: visible (or vis, rgb, v) or infrared "
                     "(or ir, thermal, i)"),
]
CamidField = Annotated[
    int | None,
    Form(ge=0, le=schemas.CAMID_MAX,
         description="camera index of the frames (camera-aware models embed it, and accept "
                     "only their own cameras: see /v1/index)"),
]
TopKField = Annotated[
    int | None,
    Form(ge=1, le=schemas.TOP_K_CEILING,
         description="matches to return (default and maximum: see /v1/index)"),
]
CameraFilterField = Annotated[
    # The pattern documents _parse_cameras's rule; that function checks it with a better message.
    list[Annotated[str, Field(json_schema_extra={"pattern": schemas.CAMERA_LIST_PATTERN})]]
    | None,
    Form(description="only gallery tracklets of these camids (repeat, or a comma list: 1,3)"),
]
QUERY_FIELDS = {"frames": True, "modality": False, "top_k": False, "cross_modal": False,
                "camera": True, "camid": False, "rerank": False, "min_probability": False}
ADD_FIELDS = {"frames": True, "modality": False, "camid": False, "camera": False, "pid": False,
              "tracklet_id": False, "timestamp": False}


def form_fields(fields: dict[str, bool]) -> Callable[[Request], Awaitable[None]]:
    """A dependency rejecting unknown form fields and repeated single-valued ones (422).

    ``fields`` maps each accepted name to whether it may repeat. FastAPI has parsed (and cached)
    the form by the time dependencies run, so this costs no second parse.
    """

    async def check(request: Request) -> None:
        form = await request.form()
        names = list(form.keys())
        unknown = sorted({n for n in names if n not in fields})
        if unknown:
            raise InvalidFieldError(
                f"unknown form field(s): {', '.join(map(repr, unknown))}; accepted: "
                f"{', '.join(fields)}", part=unknown[0],
            )
        for name, repeatable in fields.items():
            if not repeatable and len(form.getlist(name)) > 1:
                raise InvalidFieldError(
                    f"{name}: given {len(form.getlist(name))} times, expected once", part=name
                )

    return check


def get_engine(request: Request) -> QueryEngine:
    """The loaded engine, or a 503 saying why it is not there."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        error = getattr(request.app.state, "load_error", None)
        raise NotReadyError(
            f"model failed to load: {error}" if error else "model and index are still loading"
        )
    return engine


EngineDep = Annotated[QueryEngine, Depends(get_engine)]


def api_key_problem(expected: str | None, key: str | None) -> ApiError | None:
    """Why a write with header ``key`` is refused (None: allowed); compared in constant time.

    Also called from the ASGI guard on the headers alone, so a refused write never has its body
    read.
    """
    if expected is None:
        return ApiError(
            403, "writes_disabled",
            "gallery writes are disabled: start the server with --api-key-file FILE "
            "(or VVIREID_API_KEY_FILE / VVIREID_API_KEY) and send the key in X-API-Key",
            part="X-API-Key",
        )
    if not key:
        return ApiError(401, "unauthorized", "missing X-API-Key header", part="X-API-Key",
                        headers={"WWW-Authenticate": "APIKey"})
    if not secrets.compare_digest(key.encode(), expected.encode()):
        return ApiError(403, "forbidden", "wrong API key", part="X-API-Key")
    return None


def require_api_key(
    request: Request, key: Annotated[str | None, Security(API_KEY_HEADER)] = None
) -> None:
    """Gallery writes need the configured key; with none configured they are disabled."""
    problem = api_key_problem(request.app.state.api_key, key)
    if problem is not None:
        raise problem


def _read_frames(frames: list[UploadFile] | None) -> list[FramePayload]:
    return [FramePayload((f.filename or "")[-200:], f.file.read()) for f in frames or []]


def _parse_modality(value: str | None) -> Modality:
    try:
        return Modality.parse(value)
    except ValueError as exc:
        raise InvalidFieldError(f"modality: {exc}", part="modality") from None


def _parse_cameras(values: list[str] | None) -> tuple[int, ...] | None:
    """``camera`` may repeat and each value may be a comma list: "1,3" or camera=1&camera=3."""
    cameras: list[int] = []
    for value in values or []:
        for token in value.split(","):
            token = token.strip()
            if not token:
                continue
            # ASCII digits only (str.isdigit accepts "²"), and a bounded length before int().
            if not _CAMID_TOKEN.fullmatch(token) or int(token) > schemas.CAMID_MAX:
                raise InvalidFieldError(
                    f"camera: {token[:40]!r} is not a camid (an integer 0..{schemas.CAMID_MAX}; "
                    "a comma list such as 1,3)",
                    part="camera",
                )
            cameras.append(int(token))
    return tuple(sorted(set(cameras))) or None


def _thumbnail_url(request: Request, tracklet_id: str) -> str:
    root = request.scope.get("root_path", "")
    return f"{root}/v1/tracklets/{quote(tracklet_id, safe='')}/thumbnail"


def _match(
    request: Request, hit: Hit, similarity: float | None, probability: float | None = None
) -> schemas.Match:
    return schemas.Match(
        rank=hit.rank, tracklet_id=hit.tracklet_id, score=float(hit.score), similarity=similarity,
        modality=Modality(hit.modality).label, camid=hit.camid, camera=hit.camera, pid=hit.pid,
        timestamp=hit.timestamp, probability=probability,
        thumbnail_url=_thumbnail_url(request, hit.tracklet_id),
    )


def _elapsed_ms(request: Request) -> float:
    started = getattr(request.state, "started", None) or time.perf_counter()
    return (time.perf_counter() - started) * 1000.0


def _query_response(
    request: Request, engine: QueryEngine, spec: QuerySpec, result: QueryResult
) -> schemas.QueryResponse:
    size, version = engine.index_state
    metrics = request.app.state.metrics
    for stage in ("decode", "encode", "search"):
        metrics.stage.observe(result.timings_ms[stage] / 1000.0, stage=stage)
    timings = schemas.Timings(**result.timings_ms, total=_elapsed_ms(request))
    # One access-log line per request (written by the middleware) carries these details.
    request.state.detail = (
        f"{result.num_frames} {spec.modality.label} frames -> {result.gallery_modality.label}, "
        f"k={spec.top_k}, {len(result.hits)} hits, batch {result.batch_size}"
    )
    return schemas.QueryResponse(
        request_id=getattr(request.state, "request_id", None),
        matches=[
            _match(request, hit, similarity, probability)
            for hit, similarity, probability in zip(
                result.hits, result.similarities,
                result.probabilities or [None] * len(result.hits), strict=True,
            )
        ],
        query=schemas.QueryInfo(
            modality=spec.modality.label, gallery_modality=result.gallery_modality.label,
            cross_modal=spec.cross_modal, frames=result.num_frames, top_k=spec.top_k,
            cameras=list(spec.cameras) if spec.cameras else None, camid=spec.camid,
            batch_size=result.batch_size,
        ),
        timings_ms=timings,
        model_fingerprint=engine.fingerprint,
        index_fingerprint=engine.index.fingerprint,
        index_size=size,
        index_version=version,
    )


@router.post(
    "/v1/query", response_model=schemas.QueryResponse, responses=_ERRORS,
    operation_id="query_v1", summary="Rank gallery tracklets for a query tracklet",
    dependencies=[Depends(form_fields(QUERY_FIELDS))],
)
@router.post(
    "/query", response_model=schemas.QueryResponse, responses=_ERRORS,
    operation_id="query", summary="Rank gallery tracklets (alias of /v1/query)",
    dependencies=[Depends(form_fields(QUERY_FIELDS))],
)
def query(
    request: Request,
    engine: EngineDep,
    modality: ModalityField,
    frames: FramesField = None,
    top_k: TopKField = None,
    cross_modal: Annotated[
        schemas.BoolInput,
        Form(description="true: infrared queries search visible tracklets and vice versa; "
                         "false: search the query's own modality"),
    ] = "true",
    camera: CameraFilterField = None,
    camid: CamidField = None,
    rerank: Annotated[
        schemas.BoolInput,
        Form(description="true: k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3) of the "
                         "top-100 shortlist before top_k is cut"),
    ] = "false",
    min_probability: Annotated[
        float | None,
        Form(gt=0.0, lt=1.0, description="drop matches whose calibrated probability is lower "
                                         "(needs `vvireid-train calibrate` for this model)"),
    ] = None,
) -> schemas.QueryResponse:
    """Find the gallery tracklets closest to the uploaded frames.

    Frames are sampled to the model's sequence length with its test-time rule, encoded (batched
    with concurrent queries) and searched in the gallery.
    """
    settings = request.app.state.settings
    top_k = settings.default_top_k if top_k is None else top_k
    if top_k > settings.max_top_k:
        raise InvalidFieldError(f"top_k: at most {settings.max_top_k}, got {top_k}", part="top_k")
    spec = QuerySpec(
        modality=_parse_modality(modality), top_k=top_k, cross_modal=cross_modal == "true",
        cameras=_parse_cameras(camera), camid=camid, rerank=rerank == "true",
        min_probability=min_probability,
    )
    result = engine.query(_read_frames(frames), spec)
    return _query_response(request, engine, spec, result)


@router.get(
    "/v1/index", response_model=schemas.IndexInfo, responses=_READ_ERRORS,
    summary="Model and gallery facts",
)
def index_info(request: Request, engine: EngineDep) -> schemas.IndexInfo:
    settings = request.app.state.settings
    limits = {
        "max_frames": settings.max_frames,
        "max_top_k": settings.max_top_k,
        "default_top_k": settings.default_top_k,
        "max_request_bytes": settings.max_request_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "max_request_pixels": settings.max_request_pixels,
    }
    return schemas.IndexInfo(**engine.describe(), limits=limits)


@router.get(
    "/v1/tracklets/{tracklet_id:path}/thumbnail",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}},
        **_READ_ERRORS, **_error_docs(s404="no such tracklet, or it has no thumbnail"),
    },
    summary="JPEG thumbnail of a gallery tracklet (looked up by id in the index)",
)
def thumbnail(tracklet_id: str, engine: EngineDep) -> Response:
    data = engine.thumbnail(tracklet_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})


def _item_out(request: Request, item: GalleryItem) -> schemas.GalleryItemOut:
    return schemas.GalleryItemOut(
        tracklet_id=item.tracklet_id, modality=Modality(item.modality).label, camid=item.camid,
        camera=item.camera, pid=item.pid, timestamp=item.timestamp, frames=len(item.frames),
        thumbnail_url=_thumbnail_url(request, item.tracklet_id),
    )


@router.post(
    "/v1/gallery", response_model=schemas.GalleryAddResponse, status_code=201,
    responses=_WRITE_ERRORS,
    dependencies=[Depends(require_api_key), Depends(form_fields(ADD_FIELDS))],
    summary="Add a tracklet to the gallery (needs X-API-Key); saved before the answer",
)
def gallery_add(
    request: Request,
    engine: EngineDep,
    modality: ModalityField,
    camid: Annotated[
        int, Form(ge=0, le=schemas.CAMID_MAX, description="camera index of the tracklet")
    ],
    frames: FramesField = None,
    camera: Annotated[str | None, Form(max_length=200, description="camera name")] = None,
    pid: Annotated[
        int | None, Form(ge=0, le=schemas.PID_MAX, description="identity, if known")
    ] = None,
    tracklet_id: Annotated[
        str | None,
        Form(pattern=schemas.TRACKLET_ID_REGEX, max_length=128,
             description="id to use (default: generated); letters, digits and . _ : @ + -"),
    ] = None,
    timestamp: Annotated[
        float | None,
        Form(allow_inf_nan=False, ge=-schemas.TIMESTAMP_MAX, le=schemas.TIMESTAMP_MAX,
             description="a finite number, e.g. seconds since the epoch"),
    ] = None,
) -> schemas.GalleryAddResponse:
    item = engine.add_tracklet(
        _read_frames(frames), modality=_parse_modality(modality), camid=camid,
        tracklet_id=tracklet_id, camera=camera, pid=pid, timestamp=timestamp,
    )
    size, version = engine.index_state
    return schemas.GalleryAddResponse(
        request_id=getattr(request.state, "request_id", None), added=_item_out(request, item),
        index_size=size, index_version=version,
    )


@router.delete(
    "/v1/gallery/{tracklet_id:path}", response_model=schemas.GalleryDeleteResponse,
    responses={**_WRITE_ERRORS, **_error_docs(s404="no such tracklet")},
    dependencies=[Depends(require_api_key)],
    summary="Remove a tracklet from the gallery (needs X-API-Key); saved before the answer",
)
def gallery_delete(
    request: Request, tracklet_id: str, engine: EngineDep
) -> schemas.GalleryDeleteResponse:
    engine.remove_tracklet(tracklet_id)
    size, version = engine.index_state
    return schemas.GalleryDeleteResponse(
        request_id=getattr(request.state, "request_id", None), removed=tracklet_id,
        index_size=size, index_version=version,
    )


@router.get("/healthz", response_model=schemas.Health, summary="The process is alive")
async def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get(
    "/readyz", response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness, "description": "loading or failed"}},
    summary="200 once the model and the index are loaded",
)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is not None:
        return JSONResponse({
            "status": "ready", "detail": None, "encode_device": str(engine.encoder.device),
            "search_device": getattr(engine.index, "search_device", "milvus"),
        })
    error = getattr(state, "load_error", None)
    body = {"status": "failed", "detail": str(error)} if error else {"status": "loading",
                                                                      "detail": None}
    return JSONResponse(body, status_code=503)


@router.get(
    "/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
    responses={
        200: {"content": {CONTENT_TYPE.split(";")[0]: {}}},
        **_error_docs(s401="metrics_key is set and the bearer token is missing or wrong"),
    },
)
async def metrics(
    request: Request, authorization: Annotated[str | None, Security(METRICS_AUTH)] = None
) -> PlainTextResponse:
    """Prometheus text format. With ``metrics_key`` set it needs ``Authorization: Bearer KEY``."""
    key = request.app.state.settings.metrics_key
    if key is not None:
        given = authorization or ""
        expected = "Bearer " + key.get_secret_value()
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "unauthorized", "metrics need 'Authorization: Bearer KEY' "
                           "(the server's metrics_key)", part="Authorization",
                           headers={"WWW-Authenticate": "Bearer"})
    return PlainTextResponse(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


_EXAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_EXAMPLE_FRAME_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
                        ".webp": "image/webp"}
EXAMPLE_FILE = "example.json"


def _examples_dir(request: Request) -> Path:
    folder = request.app.state.settings.examples_dir
    if folder is None:
        raise ApiError(404, "not_found", "this server offers no example queries "
                       "(examples_dir / VVIREID_EXAMPLES_DIR is not set)")
    return Path(folder)


def read_examples(folder: Path) -> list[dict[str, Any]]:
    """Example query tracklets: each subfolder of ``folder`` with an ``example.json``
    (``modality``, optional ``pid``, ``camid``, ``label``) and its frames, in name order.

    Why a folder and not the index: the examples are queries, which the gallery does not hold
    (the demo copies held-out query tracklets there). Unreadable entries are logged and skipped.
    """
    examples = []
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        meta_path = sub / EXAMPLE_FILE
        if not (_EXAMPLE_NAME.fullmatch(sub.name) and meta_path.is_file()):
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            modality = Modality.parse(meta["modality"]).label
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("example %s skipped: %s", meta_path, exc)
            continue
        frames = sorted(
            (f.name for f in sub.iterdir()
             if f.suffix.lower() in _EXAMPLE_FRAME_TYPES and _EXAMPLE_NAME.fullmatch(f.name)),
            key=lambda name: (len(name), name),
        )
        if frames:
            examples.append({
                "name": sub.name, "modality": modality, "pid": meta.get("pid"),
                "camid": meta.get("camid"), "label": meta.get("label", sub.name),
                "frames": [f"v1/examples/{sub.name}/{quote(f)}" for f in frames],
            })
    return examples


@router.get("/v1/examples", include_in_schema=False)
def examples(request: Request) -> JSONResponse:
    """The page's "try an example" list (frame URLs are relative to the page, as its own calls)."""
    return JSONResponse({"examples": read_examples(_examples_dir(request))})


@router.get("/v1/examples/{name}/{frame}", include_in_schema=False)
def example_frame(request: Request, name: str, frame: str) -> FileResponse:
    """One frame of an example; names are single path components, so nothing outside the folder
    can be reached."""
    path = _examples_dir(request) / name / frame
    media_type = _EXAMPLE_FRAME_TYPES.get(Path(frame).suffix.lower())
    valid = _EXAMPLE_NAME.fullmatch(name) and _EXAMPLE_NAME.fullmatch(frame)
    if not (valid and media_type and path.is_file()):
        raise ApiError(404, "not_found", f"no example frame {name}/{frame}", part="path")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "max-age=300"})


@router.get("/docs", include_in_schema=False)
async def swagger_page() -> FileResponse:
    """Swagger UI from files served here (no CDN), started by a script file (the CSP allows no
    inline script)."""
    return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")


@router.get("/redoc", include_in_schema=False)
async def redoc_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "redoc.html", media_type="text/html")


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
