"""File names derived from record ids.

Record ids are paths relative to a source's root (``images/a/x.png``), official ids
(``ISIC_0000000``) or generated ones (``train_17``). Anything written per record
(``explanations/<map>/<id>.npz``, failure-case PNGs) goes through :func:`safe_filename`, so an id
never escapes its folder and two ids never share a file.
"""
from __future__ import annotations

import hashlib
import re

# Longest name returned; leaves room for a caller's prefix/extension within the common
# 255-byte limit of a path component (ext4, NTFS, APFS).
MAX_LENGTH = 120
HASH_CHARS = 12  # 48 bits of blake2b: a collision needs the same slug *and* the same hash
# "~" never occurs in a name returned unchanged, so a hashed name cannot equal a safe id.
_SEPARATOR = "~"
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
# Windows device names, reserved with any extension (``con.png``) and in any case.
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
             *(f"{p}{i}" for p in ("COM", "LPT") for i in range(10))}


def _is_reserved(name: str) -> bool:
    return name.split(".", 1)[0].upper() in _RESERVED


def is_safe_filename(name: str) -> bool:
    """True if ``name`` is a single, portable path component that :func:`safe_filename` keeps.

    Portable means: ASCII letters, digits and ``._-`` only, starting with a letter, digit or
    ``_`` (so never ``.``, ``..``, a hidden file or an option-like ``-x``), not ending with ``.``
    (Windows drops it), not a Windows device name, at most :data:`MAX_LENGTH` characters.
    """
    return (len(name) <= MAX_LENGTH and _SAFE.fullmatch(name) is not None
            and not name.endswith(".") and not _is_reserved(name))


def safe_filename(record_id: str) -> str:
    """Map a record id to one path component usable on every OS.

    An id that is already safe (:func:`is_safe_filename`) is returned unchanged. Any other id
    becomes a readable slug (unsafe runs replaced by ``_``, bounded length) plus ``~`` and a short
    blake2b hash of the *original* id, so ``a/x.png`` -> ``a_x.png~<hash>`` never collides with the
    id ``a_x.png`` (returned as is) or with ``a\\x.png``.

    Names differing only in letter case (``A.png``, ``a.png``) stay distinct strings but share a
    file on case-insensitive file systems (default macOS, Windows).

    Args:
        record_id: the record's ``id``.

    Returns:
        A name without ``/``, ``\\``, control characters or ``..``, at most :data:`MAX_LENGTH`
        characters long.

    Raises:
        TypeError: ``record_id`` is not a ``str``.
    """
    if not isinstance(record_id, str):
        raise TypeError(f"record id must be a str, got {type(record_id).__name__} {record_id!r}")
    if is_safe_filename(record_id):
        return record_id
    digest = hashlib.blake2b(record_id.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()[:HASH_CHARS]
    slug = _UNSAFE_RUN.sub("_", record_id).lstrip("._-")
    slug = slug[: MAX_LENGTH - HASH_CHARS - len(_SEPARATOR)].rstrip(".")
    if not slug or _is_reserved(slug):
        slug = f"_{slug}"[: MAX_LENGTH - HASH_CHARS - len(_SEPARATOR)]
    return f"{slug}{_SEPARATOR}{digest}"
