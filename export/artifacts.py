"""The exported-artifact helpers under their earlier import path (``diffrt.export.artifacts``), kept so that
code written against it keeps working: they now live in :mod:`diffrt.artifacts` (the cache's reader, which
the runtime's backends use) and :mod:`diffrt.files` (atomic writes)."""

from ..artifacts import (  # noqa: F401
    EXPORT_FORMAT,
    LOCK,
    MANIFEST,
    ArtifactError,
    default_cache_dir,
    file_record,
    file_sha256,
    key_hash,
    library_versions,
    locked,
    model_hash,
    move_into_place,
    read_manifest,
    resolve_cache_dir,
    scratch_dir,
    verify_files,
)
from ..files import atomic_write_bytes, atomic_write_json  # noqa: F401
