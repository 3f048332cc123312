"""One gallery interface, two backends: the embedded FAISS gallery and a Milvus collection.

Why a protocol: the indexer CLI, the build pipeline and the query server only need "add, remove,
get, search with filters, count, stats, fingerprint". Writing that down as
:class:`GalleryBackend` lets a deployment that outgrows one machine swap the embedded
:class:`~vvireid.indexer.store.GalleryIndex` (FAISS plus local files) for
:class:`~vvireid.indexer.milvus.MilvusGallery` (a sharded, replicated Milvus server) without any
caller changing. The protocol is derived from ``GalleryIndex``'s public API, which stays the
reference implementation; ``MilvusGallery`` mirrors it, and a contract test suite
(``tests/indexer/test_gallery_contract.py``) runs the same expectations against both.

Search semantics shared by every backend: ``modality`` is the *gallery* modality searched (the
caller picks the other modality of the query for cross-modal search, the default, see
:func:`gallery_modality`), ``camids`` restricts gallery cameras, and scores are inner products
of (for ``cosine`` galleries L2-normalised) float32 vectors, higher is closer.

:func:`open_gallery` and :func:`create_gallery` pick the backend from options
(:class:`BackendOptions`); Milvus credentials come from a file or an environment variable, never
from a command-line argument (visible in ``ps`` and shell history).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from vvireid.indexer.store import GalleryItem, Hit
from vvireid.model.types import Modality

BACKENDS = ("faiss", "milvus")
DEFAULT_BACKEND = "faiss"

# Environment variables holding Milvus credentials (a token, or user + password); *_FILE variants
# name a file whose first line holds the value (for Docker/Kubernetes secrets).
ENV_TOKEN = "VVIREID_MILVUS_TOKEN"
ENV_TOKEN_FILE = "VVIREID_MILVUS_TOKEN_FILE"
ENV_USER = "VVIREID_MILVUS_USER"
ENV_PASSWORD = "VVIREID_MILVUS_PASSWORD"
ENV_PASSWORD_FILE = "VVIREID_MILVUS_PASSWORD_FILE"


class GalleryUnavailableError(RuntimeError):
    """The gallery's storage cannot be reached right now (e.g. the Milvus server is down).

    Distinct from bad input: the request may succeed when retried later, so the server answers
    503 with ``Retry-After`` instead of a 500.
    """


@runtime_checkable
class GalleryBackend(Protocol):
    """What the indexer and the server need from a gallery (see the module docstring).

    Attributes mirror ``GalleryIndex``: ``dim``, ``fingerprint`` (the model that built it),
    ``similarity`` (``cosine`` or ``inner_product``), ``index_type`` and ``model_config``.
    """

    dim: int
    fingerprint: str
    similarity: str
    index_type: str
    model_config: dict[str, Any]

    @property
    def path(self) -> Any:
        """Where the gallery lives (a folder, or a Milvus URI + collection), for messages."""
        ...

    def add(
        self,
        items: Sequence[GalleryItem],
        vectors: np.ndarray,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> None:
        """Add tracklets (all or nothing); ValueError on bad rows or already indexed ids."""
        ...

    def remove(self, tracklet_ids: Sequence[str]) -> int:
        """Remove tracklets (all or nothing); KeyError naming the ids not indexed."""
        ...

    def get(self, tracklet_id: str) -> GalleryItem | None:
        """Metadata of one tracklet, None when absent."""
        ...

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        modality: Modality | str | None = None,
        camids: Collection[int] | None = None,
    ) -> list[list[Hit]]:
        """``k`` best hits per query row, best first, filtered inside the search."""
        ...

    def thumbnail(self, tracklet_id: str) -> bytes | None:
        """The stored JPEG thumbnail, None when absent."""
        ...

    def tracklet_ids(self) -> list[str]:
        """Every indexed tracklet id."""
        ...

    def vectors(self, tracklet_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``tracklet_ids`` in that order, float32 [N, D] (for merges and
        migrations between backends); KeyError naming ids that are not stored."""
        ...

    def save(self) -> None:
        """Make the changes so far durable (FAISS: write files; Milvus: flush)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counts per modality/camera and what the gallery is (dim, metric, model)."""
        ...

    def close(self) -> None:
        """Release files or connections."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, tracklet_id: object) -> bool: ...

    def __enter__(self) -> GalleryBackend: ...

    def __exit__(self, *exc: object) -> None: ...


def gallery_modality(query: Modality | str, scope: str = "cross") -> Modality | None:
    """The gallery modality to search for a query: ``cross`` (default: ``ir_to_vis`` /
    ``vis_to_ir``), ``same`` or ``any`` (None: both)."""
    query = Modality.parse(query)
    if scope == "cross":
        return query.other
    if scope == "same":
        return query
    if scope == "any":
        return None
    raise ValueError(f"scope must be cross, same or any, got {scope!r}")


@dataclass(frozen=True)
class BackendOptions:
    """Which backend holds the gallery and how to reach it.

    ``milvus_uri``: a path ending in ``.db`` runs Milvus Lite in-process; ``http(s)://host:19530``
    reaches a Milvus standalone or cluster server. ``token``/``user``/``password`` are resolved
    from the environment by :meth:`from_env`; ``collection`` defaults to ``vvireid_gallery``.
    """

    backend: str = DEFAULT_BACKEND
    milvus_uri: str | None = None
    collection: str | None = None
    token: str | None = None
    user: str | None = None
    password: str | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "milvus" and not self.milvus_uri:
            raise ValueError("backend milvus needs a Milvus URI (--milvus-uri / VVIREID_MILVUS_URI)")

    @classmethod
    def from_env(
        cls,
        backend: str | None = None,
        milvus_uri: str | None = None,
        *,
        collection: str | None = None,
        timeout_s: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> BackendOptions:
        """Options with credentials read from ``VVIREID_MILVUS_*`` variables or their files.

        Raises:
            ValueError: a credential file is unreadable or empty (named), or bad backend/URI.
        """
        env = os.environ if environ is None else environ
        backend = backend or env.get("VVIREID_BACKEND") or DEFAULT_BACKEND
        milvus_uri = milvus_uri or env.get("VVIREID_MILVUS_URI") or None
        return cls(
            backend=backend,
            milvus_uri=milvus_uri,
            collection=collection or env.get("VVIREID_MILVUS_COLLECTION") or None,
            token=_secret(env, ENV_TOKEN, ENV_TOKEN_FILE),
            user=env.get(ENV_USER) or None,
            password=_secret(env, ENV_PASSWORD, ENV_PASSWORD_FILE),
            timeout_s=timeout_s,
        )

    def describe(self) -> str:
        """Where the gallery lives, without secrets (for logs and errors)."""
        return "faiss" if self.backend == "faiss" else f"milvus {self.milvus_uri}"


def _secret(env: Mapping[str, str], name: str, file_name: str) -> str | None:
    """A credential from ``name`` or from the first line of the file ``file_name`` names."""
    value = env.get(name)
    if value:
        return value.strip()
    path = env.get(file_name)
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{file_name}: cannot read {path} ({exc.strerror or exc})") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"{file_name}: {path} is empty")
    return lines[0].strip()


def open_gallery(
    location: str | Path,
    options: BackendOptions | None = None,
    *,
    expected_fingerprint: str | None = None,
    expected_dim: int | None = None,
    device: str = "auto",
    verify: bool = True,
) -> GalleryBackend:
    """Open an existing gallery: a FAISS index folder, or (milvus) a collection at the URI.

    For Milvus, ``location`` names the collection unless ``options.collection`` does.

    Raises:
        IndexFormatError / IndexMismatchError: as ``GalleryIndex.open`` (missing, corrupt, or built
            by another model).
        GalleryUnavailableError: the Milvus server cannot be reached (the message names the URI).
    """
    options = options or BackendOptions()
    if options.backend == "milvus":
        from vvireid.indexer.milvus import MilvusGallery

        return MilvusGallery.open(
            options,
            collection=options.collection or collection_name(location),
            expected_fingerprint=expected_fingerprint,
            expected_dim=expected_dim,
        )
    from vvireid.indexer.store import GalleryIndex

    return GalleryIndex.open(
        location,
        expected_fingerprint=expected_fingerprint,
        expected_dim=expected_dim,
        device=device,
        verify=verify,
    )


def create_gallery(
    location: str | Path,
    options: BackendOptions | None = None,
    *,
    dim: int,
    model_fingerprint: str,
    similarity: str,
    index_type: str = "flat",
    model_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> GalleryBackend:
    """A new, empty gallery (FAISS: the folder is written by the first add or ``save``; Milvus:
    the collection is created at once).

    Raises:
        FileExistsError: the gallery exists and ``overwrite`` is False.
        ValueError: bad dim, similarity or index type.
    """
    options = options or BackendOptions()
    if options.backend == "milvus":
        from vvireid.indexer.milvus import MilvusGallery

        return MilvusGallery.create(
            options,
            collection=options.collection or collection_name(location),
            dim=dim,
            model_fingerprint=model_fingerprint,
            similarity=similarity,
            index_type=index_type,
            model_config=model_config,
            overwrite=overwrite,
        )
    from vvireid.indexer.store import GalleryIndex

    return GalleryIndex.create(
        location,
        dim=dim,
        model_fingerprint=model_fingerprint,
        similarity=similarity,
        index_type=index_type,
        model_config=model_config,
        overwrite=overwrite,
        device=device,
    )


def collection_name(location: str | Path) -> str:
    """A valid Milvus collection name from a gallery name or folder (letters, digits, ``_``).

    Raises:
        ValueError: nothing usable is left.
    """
    raw = Path(str(location)).name or str(location)
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in raw)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = f"g_{name}"
    if name.strip("_") == "" or len(name) > 255:
        raise ValueError(f"{location!r}: not usable as a Milvus collection name")
    return name


def merge_galleries(
    out: str | Path,
    shards: Sequence[str | Path],
    *,
    index_type: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge the FAISS galleries of a sharded build into one gallery at ``out``.

    The shards must come from one model (same fingerprint, dim and similarity) and hold disjoint
    tracklet ids; ``out`` is written once, atomically, at the end (``save``).

    Raises:
        IndexMismatchError: a shard was built by another model (named).
        ValueError: no shards, or a tracklet id in two shards (both named).
        FileExistsError: ``out`` holds an index and ``overwrite`` is False.
    """
    from vvireid.indexer.store import GalleryIndex, IndexMismatchError

    if not shards:
        raise ValueError("merge needs at least one shard gallery")
    opened = [GalleryIndex.open(path, device="cpu") for path in shards]
    try:
        first = opened[0]
        seen: dict[str, str] = {}
        for shard in opened:
            if (shard.fingerprint, shard.dim, shard.similarity) != (
                first.fingerprint, first.dim, first.similarity
            ):
                raise IndexMismatchError(
                    f"{shard.path}: built with model {shard.fingerprint} ({shard.dim}-d, "
                    f"{shard.similarity}), but {first.path} with {first.fingerprint} "
                    f"({first.dim}-d, {first.similarity}); shards of one gallery need one model"
                )
            for tracklet_id in shard.tracklet_ids():
                if tracklet_id in seen:
                    raise ValueError(
                        f"tracklet id {tracklet_id!r} is in two shards: {seen[tracklet_id]} and "
                        f"{shard.path}"
                    )
                seen[tracklet_id] = str(shard.path)
        merged = GalleryIndex.create(
            out,
            dim=first.dim,
            model_fingerprint=first.fingerprint,
            similarity=first.similarity,
            index_type=index_type or first.index_type,
            model_config=first.model_config,
            overwrite=overwrite,
            device="cpu",
        )
        for shard in opened:
            ids = shard.tracklet_ids()
            items = [shard.get(t) for t in ids]
            merged.add(items, shard.vectors(ids), [shard.thumbnail(t) for t in ids])
        merged.save()
        summary = {
            "command": "merge",
            "index": str(merged.path),
            "shards": [str(s.path) for s in opened],
            "count": len(merged),
            "per_shard": {str(s.path): len(s) for s in opened},
        }
        merged.close()
        return summary
    finally:
        for shard in opened:
            shard.close()
