"""``MilvusGallery``: the gallery in a Milvus collection (Milvus Lite file, standalone or cluster).

Why Milvus: a city-scale gallery (hundreds of millions of tracklets, many sites, many query
servers) outgrows one machine. Milvus shards and replicates a collection, filters on scalar
fields inside the vector search and offers GPU indexes (GPU_CAGRA, GPU_IVF_FLAT) on its GPU
images. ``pymilvus.MilvusClient`` speaks to all deployments with one API: a URI ending in ``.db``
runs Milvus Lite in this process (tests, laptops), ``http(s)://host:19530`` reaches a server.

Schema (one row per tracklet)::

    tracklet_id  VARCHAR(512) primary key
    vector       FLOAT_VECTOR(dim), metric IP (inner product; cosine galleries store unit rows)
    modality     INT8   (Modality.VISIBLE = 0, Modality.INFRARED = 1)  -- filtered in the search
    camid        INT32                                                 -- filtered in the search
    camera       VARCHAR(256), nullable (display name)
    pid          INT64, nullable
    timestamp    DOUBLE, nullable (seconds)
    frames       JSON   (list of frame paths, as in the FAISS gallery)
    thumbnail    VARCHAR(65535), nullable: the JPEG, base64-encoded

The model fingerprint, similarity, dimension, index type and model config are collection
properties (``vvireid.*``); :meth:`MilvusGallery.open` refuses a mismatched checkpoint with
``IndexMismatchError`` exactly like the FAISS gallery.

Thumbnails live in the row (base64 VARCHAR) so that every query server sees them without a shared
file system. Limit: Milvus VARCHARs hold at most 65,535 bytes, so a thumbnail may be at most
``MAX_THUMBNAIL_BYTES`` (48,000) bytes of JPEG; larger ones are refused with the tracklet named.
The indexer's thumbnails (128 px high JPEG) are a few KB.

Differences from the FAISS gallery, by design: changes are written at once (``save`` only
flushes); ``create(overwrite=True)`` drops the old collection first (not atomic); ``top-k`` is at
most 16,384 per query (Milvus's limit). A lost connection raises
:class:`~vvireid.indexer.gallery.GalleryUnavailableError` and the next call reconnects.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from vvireid.indexer.backend import prepare_vectors
from vvireid.indexer.db import check_model
from vvireid.indexer.gallery import BackendOptions, GalleryUnavailableError
from vvireid.indexer.store import (
    SIMILARITIES,
    GalleryItem,
    Hit,
    IndexFormatError,
)
from vvireid.model.types import Modality

log = logging.getLogger(__name__)

FORMAT = "vvireid.milvus"
FORMAT_VERSION = 1
MAX_THUMBNAIL_BYTES = 48_000
MAX_TOP_K = 16_384
MAX_ID_LENGTH = 512
_BATCH = 1_000
_PREFIX = "vvireid."
# Our index type names (as the FAISS backend's) plus Milvus's own, mapped to Milvus index types.
INDEX_TYPES = {
    "flat": "FLAT",
    "ivf": "IVF_FLAT",
    "ivfpq": "IVF_PQ",
    "hnsw": "HNSW",
    "autoindex": "AUTOINDEX",
    "gpu_cagra": "GPU_CAGRA",
    "gpu_ivf_flat": "GPU_IVF_FLAT",
    "gpu_ivf_pq": "GPU_IVF_PQ",
    "gpu_brute_force": "GPU_BRUTE_FORCE",
}
_OUTPUT = ["modality", "camid", "camera", "pid", "timestamp"]
T = TypeVar("T")


def connect(options: BackendOptions) -> Any:
    """A ``MilvusClient`` for ``options.milvus_uri`` (Milvus Lite for a ``.db`` path).

    Raises:
        ValueError: the URI is neither a ``.db`` path nor ``http(s)://host:port``.
        GalleryUnavailableError: the server cannot be reached (the message names the URI).
    """
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    uri = str(options.milvus_uri or "")
    kwargs: dict[str, Any] = {}
    if uri.endswith(".db") and "://" not in uri:
        Path(uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).expanduser().resolve())
    elif uri.startswith(("http://", "https://", "tcp://")):
        if options.token:
            kwargs["token"] = options.token
        elif options.user:
            kwargs.update(user=options.user, password=options.password or "")
        if options.timeout_s:
            kwargs["timeout"] = options.timeout_s
    else:
        raise ValueError(
            f"milvus_uri {uri!r}: use a path ending in .db (Milvus Lite) or "
            "http(s)://host:19530 (Milvus server)"
        )
    try:
        return MilvusClient(uri=uri, **kwargs)
    except MilvusException as exc:
        raise GalleryUnavailableError(f"cannot reach Milvus at {uri}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - grpc/lite start-up errors have no common base
        raise GalleryUnavailableError(f"cannot reach Milvus at {uri}: {exc}") from None


def check_item(item: GalleryItem) -> str | None:
    """Why ``item`` cannot be stored, or None (same rules as the FAISS gallery)."""
    if not isinstance(item.tracklet_id, str) or not item.tracklet_id.strip():
        return f"tracklet_id must be a non-empty string, got {item.tracklet_id!r}"
    if len(item.tracklet_id.encode()) > MAX_ID_LENGTH:
        return f"{item.tracklet_id[:40]}...: tracklet_id longer than {MAX_ID_LENGTH} bytes"
    if not isinstance(item.modality, Modality):
        return f"{item.tracklet_id}: modality must be a Modality, got {item.modality!r}"
    if (
        isinstance(item.camid, bool)
        or not isinstance(item.camid, (int, np.integer))
        or not 0 <= item.camid < 2**31
    ):
        return f"{item.tracklet_id}: camid must be an integer >= 0, got {item.camid!r}"
    return None


def _quote(text: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(text)


class MilvusGallery:
    """A gallery stored in one Milvus collection; see the module docstring.

    Thread safety: pymilvus clients are safe to share between threads; the reconnect after a
    lost connection is serialised by a lock.
    """

    def __init__(self, options: BackendOptions, collection: str, meta: dict[str, Any]) -> None:
        self.options = options
        self.collection = collection
        self.dim = int(meta["dim"])
        self.fingerprint = str(meta["model_fingerprint"])
        self.similarity = str(meta["similarity"])
        self.index_type = str(meta["index_type"])
        self.model_config: dict[str, Any] = dict(meta.get("model_config") or {})
        self.created = str(meta.get("created") or "")
        self._client: Any = None
        self._client_lock = threading.Lock()

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        options: BackendOptions,
        *,
        collection: str,
        dim: int,
        model_fingerprint: str,
        similarity: str,
        index_type: str = "flat",
        model_config: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> MilvusGallery:
        """Create the collection (schema, vector index, properties) and load it.

        Raises:
            ValueError: bad dim, similarity or index type.
            FileExistsError: the collection exists and ``overwrite`` is False.
            GalleryUnavailableError: Milvus cannot be reached.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; known: {', '.join(SIMILARITIES)}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        meta = {
            "dim": int(dim),
            "model_fingerprint": model_fingerprint,
            "similarity": similarity,
            "index_type": index_type,
            "model_config": model_config or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        gallery = cls(options, collection, meta)
        client = gallery._connected()
        gallery._guard(lambda: gallery._create_collection(client, meta, overwrite))
        log.info("created Milvus collection %s at %s", collection, options.milvus_uri)
        return gallery

    def _create_collection(self, client: Any, meta: dict[str, Any], overwrite: bool) -> None:
        from pymilvus import DataType, MilvusClient

        if client.has_collection(self.collection):
            if not overwrite:
                raise FileExistsError(
                    f"{self.path}: collection already exists (overwrite it explicitly)"
                )
            client.drop_collection(self.collection)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("tracklet_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("modality", DataType.INT8)
        schema.add_field("camid", DataType.INT32)
        schema.add_field("camera", DataType.VARCHAR, max_length=256, nullable=True)
        schema.add_field("pid", DataType.INT64, nullable=True)
        schema.add_field("timestamp", DataType.DOUBLE, nullable=True)
        schema.add_field("frames", DataType.JSON)
        schema.add_field("thumbnail", DataType.VARCHAR, max_length=65_535, nullable=True)
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name="vector", index_type=INDEX_TYPES[self.index_type], metric_type="IP",
            params=self._index_build_params(),
        )
        properties = {
            f"{_PREFIX}format": FORMAT,
            f"{_PREFIX}format_version": str(FORMAT_VERSION),
            f"{_PREFIX}dim": str(meta["dim"]),
            f"{_PREFIX}model_fingerprint": meta["model_fingerprint"],
            f"{_PREFIX}similarity": meta["similarity"],
            f"{_PREFIX}index_type": meta["index_type"],
            f"{_PREFIX}model_config": json.dumps(meta["model_config"], sort_keys=True),
            f"{_PREFIX}created": meta["created"],
        }
        client.create_collection(
            self.collection, schema=schema, index_params=index_params, properties=properties,
            consistency_level="Strong",
        )

    def _index_build_params(self) -> dict[str, Any]:
        if self.index_type in ("ivf", "gpu_ivf_flat"):
            return {"nlist": 1024}
        if self.index_type in ("ivfpq", "gpu_ivf_pq"):
            return {"nlist": 1024, "m": max(m for m in range(1, 65) if self.dim % m == 0)}
        if self.index_type == "hnsw":
            return {"M": 16, "efConstruction": 200}
        return {}

    @classmethod
    def open(
        cls,
        options: BackendOptions,
        *,
        collection: str,
        expected_fingerprint: str | None = None,
        expected_dim: int | None = None,
    ) -> MilvusGallery:
        """Open an existing collection, checking the model it was built with.

        Raises:
            IndexFormatError: no such collection, or one not made by vvireid (named).
            IndexMismatchError: ``expected_fingerprint``/``expected_dim`` differ.
            GalleryUnavailableError: Milvus cannot be reached (the message names the URI).
        """
        client = connect(options)
        where = f"{options.milvus_uri}#{collection}"
        try:
            meta = cls._read_meta(client, collection, where)
        except Exception:
            client.close()
            raise
        check_model(where, meta, expected_fingerprint, expected_dim)
        gallery = cls(options, collection, meta)
        gallery._client = client
        gallery._guard(lambda: client.load_collection(collection))
        log.info("opened Milvus collection %s: %d tracklets", where, len(gallery))
        return gallery

    @classmethod
    def open_or_create(
        cls, options: BackendOptions, *, collection: str, **create: Any
    ) -> MilvusGallery:
        """Open the collection if it exists (checking the model), else create it: what every
        shard of a sharded build does, so the first one creates and the others join."""
        try:
            return cls.open(
                options,
                collection=collection,
                expected_fingerprint=create["model_fingerprint"],
                expected_dim=create["dim"],
            )
        except _MissingCollectionError:
            try:
                return cls.create(options, collection=collection, **create)
            except FileExistsError:  # another shard created it meanwhile
                return cls.open(
                    options,
                    collection=collection,
                    expected_fingerprint=create["model_fingerprint"],
                    expected_dim=create["dim"],
                )

    @staticmethod
    def _read_meta(client: Any, collection: str, where: str) -> dict[str, Any]:
        from pymilvus.exceptions import MilvusException

        try:
            if not client.has_collection(collection):
                raise _MissingCollectionError(
                    f"{where}: no such collection (build one with vvireid-index build "
                    "--backend milvus)"
                )
            props = dict(client.describe_collection(collection).get("properties") or {})
        except MilvusException as exc:
            raise GalleryUnavailableError(f"Milvus at {where}: {exc.message}") from None
        if props.get(f"{_PREFIX}format") != FORMAT:
            raise IndexFormatError(f"{where}: not a vvireid gallery collection")
        if props.get(f"{_PREFIX}format_version") != str(FORMAT_VERSION):
            raise IndexFormatError(
                f"{where}: gallery format version {props.get(f'{_PREFIX}format_version')} is not "
                f"supported (this vvireid reads version {FORMAT_VERSION})"
            )
        try:
            return {
                "dim": int(props[f"{_PREFIX}dim"]),
                "model_fingerprint": props[f"{_PREFIX}model_fingerprint"],
                "similarity": props[f"{_PREFIX}similarity"],
                "index_type": props[f"{_PREFIX}index_type"],
                "model_config": json.loads(props.get(f"{_PREFIX}model_config") or "{}"),
                "created": props.get(f"{_PREFIX}created"),
            }
        except (KeyError, ValueError) as exc:
            raise IndexFormatError(f"{where}: malformed vvireid property ({exc})") from None

    # ---- connection -----------------------------------------------------------------------

    @property
    def path(self) -> str:
        """``<uri>#<collection>``: where the gallery lives, for messages and summaries."""
        return f"{self.options.milvus_uri}#{self.collection}"

    def _connected(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = connect(self.options)
                if self._client.has_collection(self.collection):
                    self._client.load_collection(self.collection)
                log.info("connected to Milvus at %s", self.options.milvus_uri)
            return self._client

    def _guard(self, call: Callable[[], T]) -> T:
        """Run ``call``; a Milvus failure drops the client (the next call reconnects) and
        becomes GalleryUnavailableError naming the URI."""
        from pymilvus.exceptions import MilvusException

        try:
            return call()
        except MilvusException as exc:
            self._drop_client()
            raise GalleryUnavailableError(
                f"Milvus at {self.path} failed: {exc.message}; retry later"
            ) from None

    def _run(self, call: Callable[[Any], T]) -> T:
        """``call(client)`` with reconnection and error mapping."""
        from pymilvus.exceptions import MilvusException

        try:
            client = self._connected()
        except MilvusException as exc:
            self._drop_client()
            raise GalleryUnavailableError(
                f"cannot reach Milvus at {self.options.milvus_uri}: {exc.message}"
            ) from None
        return self._guard(lambda: call(client))

    def _drop_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken client may fail in any way
                log.debug("closing a failed Milvus client", exc_info=True)

    def close(self) -> None:
        """Close the connection (the gallery reconnects on the next call)."""
        self._drop_client()

    def __enter__(self) -> MilvusGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading --------------------------------------------------------------------------

    def _count(self, expr: str = "") -> int:
        rows = self._run(
            lambda c: c.query(self.collection, filter=expr, output_fields=["count(*)"])
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def __len__(self) -> int:
        return self._count()

    def __contains__(self, tracklet_id: object) -> bool:
        return isinstance(tracklet_id, str) and bool(self.existing([tracklet_id]))

    def existing(self, tracklet_ids: Iterable[str]) -> set[str]:
        """The subset of ``tracklet_ids`` already stored (one request per 1,000 ids)."""
        wanted = list(dict.fromkeys(tracklet_ids))
        found: set[str] = set()
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            rows = self._run(
                lambda c, b=batch: c.get(self.collection, ids=b, output_fields=["tracklet_id"])
            )
            found.update(str(r["tracklet_id"]) for r in rows)
        return found

    def get(self, tracklet_id: str) -> GalleryItem | None:
        """The metadata of an indexed tracklet, None when absent."""
        rows = self._run(
            lambda c: c.get(
                self.collection, ids=[tracklet_id], output_fields=[*_OUTPUT, "frames"]
            )
        )
        return _item(rows[0]) if rows else None

    def vectors(self, tracklet_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``tracklet_ids`` in that order, float32 [N, D].

        Raises:
            KeyError: naming ids that are not stored.
        """
        by_id: dict[str, list[float]] = {}
        for start in range(0, len(tracklet_ids), _BATCH):
            batch = list(tracklet_ids[start : start + _BATCH])
            rows = self._run(
                lambda c, b=batch: c.get(self.collection, ids=b, output_fields=["vector"])
            )
            by_id.update({str(r["tracklet_id"]): r["vector"] for r in rows})
        missing = [t for t in tracklet_ids if t not in by_id]
        if missing:
            raise KeyError(f"not in the gallery: {', '.join(missing[:20])}")
        if not tracklet_ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray([by_id[t] for t in tracklet_ids], dtype=np.float32)

    def thumbnail(self, tracklet_id: str) -> bytes | None:
        """The tracklet's JPEG thumbnail, None when absent (unknown id or stored without)."""
        rows = self._run(
            lambda c: c.get(self.collection, ids=[tracklet_id], output_fields=["thumbnail"])
        )
        text = rows[0].get("thumbnail") if rows else None
        return base64.b64decode(text) if text else None

    def _scan(self, fields: list[str]) -> Iterable[dict[str, Any]]:
        """Every row's ``fields``, in batches (for listings and stats, not per query)."""
        iterator = self._run(
            lambda c: c.query_iterator(
                self.collection, batch_size=_BATCH, filter="", output_fields=fields
            )
        )
        try:
            while True:
                batch = self._guard(iterator.next)
                if not batch:
                    return
                yield from batch
        finally:
            iterator.close()

    def tracklet_ids(self) -> list[str]:
        """Every stored tracklet id (sorted: Milvus keeps no insertion order)."""
        return sorted(str(r["tracklet_id"]) for r in self._scan(["tracklet_id"]))

    def stats(self) -> dict[str, Any]:
        """Counts per modality and camera and what the gallery is; scans every row's scalars."""
        cams: dict[int, Counter] = {int(m): Counter() for m in Modality}
        names: dict[int, dict[str, str]] = {int(m): {} for m in Modality}
        for row in self._scan(["modality", "camid", "camera"]):
            cams[int(row["modality"])][int(row["camid"])] += 1
            if row.get("camera") is not None:
                names[int(row["modality"])][str(row["camid"])] = row["camera"]
        per_modality = {
            m.label: {
                "count": sum(cams[int(m)].values()),
                "by_camid": {str(c): n for c, n in sorted(cams[int(m)].items())},
                "camera_names": dict(sorted(names[int(m)].items())),
            }
            for m in Modality
        }
        return {
            "path": self.path,
            "backend": "milvus",
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "count": sum(v["count"] for v in per_modality.values()),
            "per_modality": per_modality,
            "dim": self.dim,
            "metric": "inner_product",
            "similarity": self.similarity,
            "index_type": self.index_type,
            "model_fingerprint": self.fingerprint,
            "model_method": self.model_config.get("method"),
            "created": self.created,
            "unsaved_changes": False,
        }

    # ---- search ---------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        modality: Modality | str | None = None,
        camids: Collection[int] | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` best gallery items per query, best first, filtered inside Milvus.

        Same contract as ``GalleryIndex.search``: ``modality`` is the gallery modality (None:
        both), ``camids`` the allowed gallery cameras, scores are inner products (cosine
        galleries: of unit vectors). ``k`` above 16,384 is cut to that (Milvus's limit).

        Shape: queries [Q, D] (or [D]) -> Q lists of hits.
        """
        if isinstance(k, bool) or int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = self._prepare(np.asarray(queries, dtype=np.float32), "queries")
        expr = _filter(None if modality is None else Modality.parse(modality), camids)
        if expr is None:
            return [[] for _ in range(len(queries))]
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.index_type in ("ivf", "ivfpq", "gpu_ivf_flat", "gpu_ivf_pq"):
            params["params"] = {"nprobe": 64}
        found = self._run(
            lambda c: c.search(
                self.collection,
                data=queries.tolist(),
                limit=min(int(k), MAX_TOP_K),
                filter=expr,
                output_fields=_OUTPUT,
                search_params=params,
            )
        )
        return [[_hit(rank, r) for rank, r in enumerate(row, start=1)] for row in found]

    def _prepare(self, vectors: np.ndarray, what: str) -> np.ndarray:
        return prepare_vectors(vectors, self.dim, self.similarity, what)

    # ---- writing --------------------------------------------------------------------------

    def add(
        self,
        items: Sequence[GalleryItem],
        vectors: np.ndarray,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> None:
        """Insert tracklets with their vectors (and optional JPEG thumbnails).

        Raises:
            ValueError: a malformed item, vector row or thumbnail, a length mismatch, or a
                tracklet id already stored or repeated (named); nothing is added then.
            GalleryUnavailableError: Milvus failed; a batch may be partly stored then (rerun
                the build: stored ids are skipped).
        """
        items = list(items)
        vectors = self._prepare(np.asarray(vectors, dtype=np.float32), "vectors")
        if len(vectors) != len(items):
            raise ValueError(f"{len(items)} items but {len(vectors)} vector rows")
        if thumbnails is not None and len(thumbnails) != len(items):
            raise ValueError(f"{len(items)} items but {len(thumbnails)} thumbnails")
        problems = [p for p in map(check_item, items) if p]
        problems += [
            f"{it.tracklet_id}: thumbnail of {len(t)} bytes is above the Milvus limit of "
            f"{MAX_THUMBNAIL_BYTES}"
            for it, t in zip(items, thumbnails or (), strict=False)
            if t and len(t) > MAX_THUMBNAIL_BYTES
        ]
        if problems:
            raise ValueError("invalid gallery items: " + "; ".join(problems[:10]))
        if not items:
            return
        counts = Counter(it.tracklet_id for it in items)
        dupes = {t for t, n in counts.items() if n > 1} | self.existing(counts)
        if dupes:
            raise ValueError(
                f"tracklet id(s) already indexed or repeated: {', '.join(sorted(dupes)[:20])}"
            )
        thumbs = list(thumbnails) if thumbnails is not None else [None] * len(items)
        rows = [_row(it, v, t) for it, v, t in zip(items, vectors, thumbs, strict=True)]
        for start in range(0, len(rows), _BATCH):
            batch = rows[start : start + _BATCH]
            self._run(lambda c, b=batch: c.insert(self.collection, b))

    def remove(self, tracklet_ids: Sequence[str]) -> int:
        """Delete tracklets; all or nothing when some are not stored.

        Raises:
            KeyError: naming the ids that are not in the gallery.
        """
        wanted = list(dict.fromkeys(tracklet_ids))
        present = self.existing(wanted)
        missing = [t for t in wanted if t not in present]
        if missing:
            raise KeyError(
                f"not in the index: {', '.join(map(str, missing[:20]))}"
                + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            )
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            self._run(lambda c, b=batch: c.delete(self.collection, ids=b))
        return len(wanted)

    def save(self) -> None:
        """Flush: rows are durable in Milvus once inserted; this seals growing segments."""
        self._run(lambda c: c.flush(self.collection))

    def drop(self) -> None:
        """Delete the whole collection (used by tests and ``--overwrite``)."""
        self._run(lambda c: c.drop_collection(self.collection))


class _MissingCollectionError(IndexFormatError):
    """The collection does not exist (so a sharded build may create it)."""


def _filter(modality: Modality | None, camids: Collection[int] | None) -> str | None:
    """The scalar filter expression; None when the camera list is empty (nothing matches)."""
    parts = []
    if modality is not None:
        parts.append(f"modality == {int(modality)}")
    if camids is not None:
        cams = sorted({int(c) for c in camids})
        if not cams:
            return None
        parts.append(f"camid in [{', '.join(map(str, cams))}]")
    return " and ".join(parts)


def _row(item: GalleryItem, vector: np.ndarray, thumb: bytes | None) -> dict[str, Any]:
    return {
        "tracklet_id": item.tracklet_id,
        "vector": vector.tolist(),
        "modality": int(item.modality),
        "camid": int(item.camid),
        "camera": item.camera,
        "pid": None if item.pid is None else int(item.pid),
        "timestamp": None if item.timestamp is None else float(item.timestamp),
        "frames": [str(f) for f in item.frames],
        "thumbnail": base64.b64encode(thumb).decode("ascii") if thumb else None,
    }


def _item(row: dict[str, Any]) -> GalleryItem:
    return GalleryItem(
        tracklet_id=str(row["tracklet_id"]),
        modality=Modality(int(row["modality"])),
        camid=int(row["camid"]),
        camera=row.get("camera"),
        pid=None if row.get("pid") is None else int(row["pid"]),
        timestamp=None if row.get("timestamp") is None else float(row["timestamp"]),
        frames=tuple(row.get("frames") or ()),
    )


def _hit(rank: int, result: dict[str, Any]) -> Hit:
    entity = result.get("entity") or {}
    return Hit(
        rank,
        str(result.get("tracklet_id", result.get("id"))),
        float(result["distance"]),
        Modality(int(entity["modality"])),
        int(entity["camid"]),
        entity.get("camera"),
        None if entity.get("pid") is None else int(entity["pid"]),
        None if entity.get("timestamp") is None else float(entity["timestamp"]),
    )


def build_milvus(
    options: BackendOptions,
    collection: str,
    encoder: Any,
    tracklets: Sequence[Any],
    *,
    index_type: str = "flat",
    overwrite: bool = False,
    budget: Any = None,
    prior_failures: Sequence[Any] = (),
    chunk_size: int = 256,
    thumbnails: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Encode ``tracklets`` into the collection, chunk by chunk; what ``build --backend milvus``
    (and every ``--shard I/N`` of it) runs.

    Why chunk by chunk instead of all at the end like the FAISS build: inserted rows are durable
    in Milvus, so a rerun after a crash skips the ids already stored and resumes where it
    stopped, and many shards can write into one collection at once. The first shard creates the
    collection; the others join it after checking the model.

    Raises:
        TooManyFailuresError: failures beyond the budget; the chunks stored so far stay (a rerun
            skips them).
        IndexMismatchError: the collection was built by another model.
    """
    from vvireid.indexer.build import (
        DEFAULT_MAX_FAILURES,
        FailureBudget,
        TooManyFailuresError,
        gallery_item,
    )

    if not encoder.fingerprint:
        raise ValueError("the model has no fingerprint: load it with model.checkpoint")
    budget = budget or FailureBudget.parse(DEFAULT_MAX_FAILURES)
    create = {
        "dim": encoder.dim,
        "model_fingerprint": str(encoder.fingerprint),
        "similarity": encoder.similarity,
        "index_type": index_type,
        "model_config": encoder.model.config.to_dict(),
    }
    if overwrite:
        gallery = MilvusGallery.create(options, collection=collection, overwrite=True, **create)
    else:
        gallery = MilvusGallery.open_or_create(options, collection=collection, **create)
    stored = gallery.existing(t.tracklet_id for t in tracklets)
    todo = [t for t in tracklets if t.tracklet_id not in stored]
    total = len(tracklets) + len(prior_failures)
    allowed = budget.allowed(total)
    failures = list(prior_failures)
    if len(failures) > allowed:
        raise TooManyFailuresError(failures, allowed, total)
    if progress:
        progress(len(stored))
    started, added = time.perf_counter(), Counter()
    chunks = encoder.encode_tracklets(todo, chunk_size=chunk_size, thumbnails=thumbnails)
    for chunk in chunks:
        if chunk.tracklets:
            gallery.add(
                [gallery_item(t) for t in chunk.tracklets],
                chunk.vectors,
                chunk.thumbnails if thumbnails else None,
            )
        added.update(Modality.parse(t.modality).label for t in chunk.tracklets)
        failures += chunk.failures
        if progress:
            progress(chunk.size)
        if len(failures) > allowed:
            chunks.close()
            gallery.save()
            raise TooManyFailuresError(failures, allowed, total)
    gallery.save()
    seconds = time.perf_counter() - started
    summary = {
        "command": "build",
        "backend": "milvus",
        "index": gallery.path,
        "index_type": gallery.index_type,
        "count": len(gallery),
        "added": sum(added.values()),
        "added_per_modality": {m.label: added.get(m.label, 0) for m in Modality},
        "resumed": len(stored),
        "encoded": len(todo),
        "seconds": round(seconds, 3),
        "device": str(encoder.device),
        "failure_count": len(failures),
        "max_failures": allowed,
        "failures": [f.to_dict() for f in failures],
        "warnings": [],
    }
    gallery.close()
    return summary
