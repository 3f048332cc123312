"""Response bodies of the HTTP API (they also document it in the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

ModalityName = Literal["visible", "infrared"]
# What a form may say (Modality.parse's spellings, lower case): the schema lists exactly these.
# Case and surrounding spaces are ignored, as Modality.parse ignores them.
ModalityInput = Annotated[
    Literal["visible", "vis", "rgb", "v", "infrared", "ir", "thermal", "i"],
    BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value),
]
BoolInput = Literal["true", "false"]
CAMID_MAX = 999_999_999  # 9 digits: parsed without overflow anywhere, fits 32 bits
PID_MAX = 2**31 - 1
TOP_K_CEILING = 100_000  # the settings' max_top_k is at most this; the schema shows the live one
TIMESTAMP_MAX = 1e12  # seconds: years beyond any camera clock, finite everywhere
TRACKLET_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"
CAMERA_LIST_PATTERN = r"^ *[0-9]{1,9} *(, *[0-9]{1,9} *)*$"


class Match(BaseModel):
    """One gallery tracklet in the ranking."""

    rank: int = Field(description="1 = best match")
    tracklet_id: str
    score: float = Field(
        description="the index's own similarity (higher is closer): cosine in [-1, 1] for "
        "X-ReID, a raw inner product (unbounded) for VLD and the baseline; comparable within "
        "one index only"
    )
    similarity: float | None = Field(
        None, ge=-1.0, le=1.0,
        description="cosine similarity of the query and gallery features, in [-1, 1], for every "
        "method (= score for cosine indexes without re-ranking); null only when the gallery "
        "backend cannot return its vectors",
    )
    modality: ModalityName
    camid: int
    camera: str | None = None
    pid: int | None = Field(None, description="identity, when the gallery knows it")
    timestamp: float | None = None
    probability: float | None = Field(
        None, ge=0.0, le=1.0,
        description="calibrated probability that this is the query's person (even prior odds); "
        "null when the model has no calibration (`vvireid-train calibrate`)",
    )
    thumbnail_url: str


class Timings(BaseModel):
    """Milliseconds per stage; ``encode`` and ``search`` are those of the query's whole batch."""

    decode: float = Field(description="decode + preprocess in the request thread")
    queue: float = Field(description="wait for the batch worker")
    encode: float
    search: float
    refine: float = Field(0.0, description="re-ranking and calibrated probabilities, in the "
                          "request thread")
    total: float = Field(description="from the request's arrival to the response")


class QueryInfo(BaseModel):
    modality: ModalityName
    gallery_modality: ModalityName = Field(description="the gallery part that was searched")
    cross_modal: bool
    frames: int
    top_k: int
    cameras: list[int] | None
    camid: int | None
    batch_size: int = Field(description="queries that shared this model call")


class QueryResponse(BaseModel):
    request_id: str | None
    matches: list[Match]
    query: QueryInfo
    timings_ms: Timings
    model_fingerprint: str
    index_fingerprint: str = Field(description="the model fingerprint the index was built with")
    index_size: int
    index_version: int = Field(description="increments with each gallery change on this server")


class IndexInfo(BaseModel):
    """Model and index facts (``index`` holds the store's own statistics)."""

    model: dict[str, Any]
    index: dict[str, Any]
    limits: dict[str, int] = Field(description="max_frames, max_top_k, max_request_bytes, ...")


class GalleryItemOut(BaseModel):
    tracklet_id: str
    modality: ModalityName
    camid: int
    camera: str | None = None
    pid: int | None = None
    timestamp: float | None = None
    frames: int
    thumbnail_url: str


class GalleryAddResponse(BaseModel):
    request_id: str | None
    added: GalleryItemOut
    index_size: int
    index_version: int


class GalleryDeleteResponse(BaseModel):
    request_id: str | None
    removed: str
    index_size: int
    index_version: int


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed"]
    detail: str | None = None
    encode_device: str | None = Field(None, description="where the model runs, e.g. cuda:0")
    search_device: str | None = Field(
        None, description="where searches run: faiss-gpu, torch-cuda, cpu or milvus"
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_frame")
    message: str
    part: str | None = Field(None, description="the request part at fault, e.g. frames[2]")


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None
