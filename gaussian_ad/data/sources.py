"""Image sources for scoring runs: folders, globs, single files, tar/zip archives, fsspec URLs.

:func:`list_source` turns a source into a sorted list of :class:`SourceItem` (plus
:class:`~gaussian_ad.images.ImageError` records for archive members it rejects);
:func:`read_items` reads the bytes of a slice of that list, e.g. one scoring shard. Nothing is
ever extracted to disk.

Which files count as images: a name ending in one of :data:`~gaussian_ad.images.IMAGE_EXTENSIONS`
(any case). Hidden files and everything under hidden folders (a name starting with ".", e.g. the
``__MACOSX/._x.png`` entries of zips made on macOS) are skipped silently, as in
:func:`~gaussian_ad.images.folder_manifest`.

Cost of reading archive members, per :func:`read_items` call (each archive is opened once):

* zip: random access through the central directory.
* uncompressed tar: one pass over the member headers, seeking over the data, up to the last
  requested member; then a seek to each requested member. Behind a remote fsspec URL those
  seeks go through fsspec's block cache, so the header pass may fetch much of the archive.
* compressed tar (gzip, bzip2, xz): no random access. The archive is decompressed from the start
  until the last requested member has been found; requested members met before their turn in
  ``items`` are held in memory until they are yielded. Items are sorted by name, not by archive
  position, so every shard of a compressed tar usually decompresses most of the archive: scoring
  N shards costs up to N decompressions of the whole file. Prefer zip or plain tar for large
  archives. Listing a compressed tar also decompresses it once.
"""

from __future__ import annotations

import contextlib
import glob
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import fsspec
import fsspec.core

from gaussian_ad.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    ImageRecord,
    entry_problem,
    scan_images,
)

TAR_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
ZIP_SUFFIXES: tuple[str, ...] = (".zip",)
MAX_ITEM_BYTES = 1 << 30
"""Items larger than this are not read (they become an ImageError): a guard against zip bombs."""

_GLOB_CHARS = frozenset("*?[")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# Errors that damaged or unsupported archive data raise (encrypted zip members: RuntimeError).
_ARCHIVE_ERRORS = (
    OSError,
    EOFError,
    RuntimeError,
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
)
_TAR_ENTRY_TYPES = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.DIRTYPE: "directory",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}
_ZIP_ENTRY_TYPES = {
    stat.S_IFLNK: "symlink",
    stat.S_IFDIR: "directory",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_ZIP_UNIX_SYSTEM = 3  # ZipInfo.create_system of archives whose external_attr holds a Unix mode


@dataclass(frozen=True)
class SourceItem:
    """One image of a source.

    ``name`` is the stable row key: the file path, ``"<archive>!<member>"`` for archive members,
    or the full URL for fsspec items. ``location`` is what to open (a local path or an fsspec
    URL, of the file itself or of its archive); ``member`` is the archive member name.
    """

    name: str
    location: str
    member: str | None = None


def list_source(source: str | os.PathLike) -> tuple[list[SourceItem], list[ImageError]]:
    """Images of ``source``, sorted by name, and the archive members that were rejected.

    ``source`` is a folder (searched recursively), a glob pattern (``*``, ``?`` or ``[``;
    ``**`` spans folders; only matching files are kept), an image file, a tar or zip archive
    (by suffix: :data:`TAR_SUFFIXES`, :data:`ZIP_SUFFIXES`), or an fsspec URL (contains
    ``"://"``) to any of those. An existing path is taken literally even if it contains glob
    characters. Archive members with an absolute path, a ``..`` component, a non-regular type
    (link, device, folder) or a name that occurs more than once are rejected, never read.

    Raises FileNotFoundError for a source that does not exist, ValueError for an unreadable,
    truncated or corrupt archive, a file that is neither an image nor an archive, and a chained
    fsspec URL (``::``).
    """
    text = os.fspath(source)
    if "://" in text:
        return _list_url(text)
    path = Path(text)
    if path.is_file() and _archive_kind(text):
        return _list_archive(str(path))
    if path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"not an image file or a supported archive: {text}")
    if path.exists() or path.is_symlink():
        records, rejected = scan_images([path])
        return _items_of(records), rejected
    if _GLOB_CHARS.intersection(text):
        matches = glob.glob(text, recursive=True)
        records, rejected = scan_images(m for m in matches if not os.path.isdir(m))
        return _items_of(records), rejected
    raise FileNotFoundError(f"image source not found: {text}")


def read_items(items: Sequence[SourceItem]) -> Iterator[tuple[SourceItem, bytes | ImageError]]:
    """Yield ``(item, bytes)`` for each item in order, or ``(item, ImageError)`` if unreadable.

    Each archive is opened once per call, on its first item, and closed when the iteration
    ends; see the module docstring for what reading members of each archive type costs.
    """
    wanted: dict[str, Counter[str]] = {}
    for item in items:
        if item.member is not None:
            wanted.setdefault(item.location, Counter())[item.member] += 1
    with contextlib.ExitStack() as stack:
        archives: dict[str, _ArchiveReader] = {}
        for item in items:
            try:
                if item.member is None:
                    data = _read_file(item.location)
                else:
                    if item.location not in archives:
                        archives[item.location] = _open_archive_reader(
                            item.location, wanted[item.location], stack
                        )
                    data = archives[item.location].read(item.member)
            except _Unreadable as exc:
                yield item, ImageError(item.name, exc.reason)
            else:
                yield item, data


class _Unreadable(Exception):
    """An item that cannot be read; ``reason`` goes into its ImageError."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ArchiveReader(Protocol):
    def read(self, member: str) -> bytes: ...


def _items_of(records: Iterable[ImageRecord]) -> list[SourceItem]:
    return [SourceItem(record.path, record.path) for record in records]


def _archive_kind(location: str) -> str | None:
    lowered = location.lower()
    if lowered.endswith(TAR_SUFFIXES):
        return "tar"
    if lowered.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name.replace("\\", "/")).suffix.lower() in IMAGE_EXTENSIONS


def _is_hidden(relative_name: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(relative_name).parts)


def _open_binary(location: str) -> BinaryIO:
    """Open a local path or an fsspec URL for binary reading."""
    if "://" in location:
        return fsspec.open(location, "rb").open()
    return open(location, "rb")  # noqa: SIM115 - the caller closes it


def _list_url(url: str) -> tuple[list[SourceItem], list[ImageError]]:
    if "::" in url:
        raise ValueError(
            f"chained fsspec URLs are not supported: {url}; give the archive's own URL instead"
        )
    fs, path = fsspec.core.url_to_fs(url)
    if _GLOB_CHARS.intersection(path):
        found, root = fs.glob(path, detail=True), _glob_root(path)
    elif fs.isdir(path):
        found, root = fs.find(path, detail=True), path
    elif fs.isfile(path):
        if _archive_kind(path):
            return _list_archive(fs.unstrip_protocol(path))
        if not _is_image_name(path):
            raise ValueError(f"not an image file or a supported archive: {url}")
        found, root = {path: {"type": "file"}}, path[: path.rfind("/") + 1]
    else:
        raise FileNotFoundError(f"image source not found: {url}")
    urls = sorted(
        fs.unstrip_protocol(name)
        for name, info in found.items()
        if info["type"] == "file" and _is_image_name(name) and not _is_hidden(name[len(root) :])
    )
    return [SourceItem(u, u) for u in urls], []


def _glob_root(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard."""
    literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return literal[: literal.rfind("/") + 1]


def _list_archive(location: str) -> tuple[list[SourceItem], list[ImageError]]:
    """Items and rejections of a tar or zip archive at a local path or URL."""
    damage = None
    try:
        with _open_binary(location) as file:
            if _archive_kind(location) == "zip":
                entries = _zip_entries(file)
            else:
                entries, damage = _tar_entries(file)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"image source not found: {location}") from exc
    except _ARCHIVE_ERRORS as exc:
        raise ValueError(f"cannot read archive {location}: {exc}") from exc
    if damage is not None and not entries:
        raise ValueError(f"cannot read archive {location}: {damage}")
    counts = Counter(name for name, _ in entries)
    items: list[SourceItem] = []
    errors: list[ImageError] = []
    if damage is not None:
        last = entries[-1][0]
        errors.append(
            ImageError(location, f"archive truncated or damaged after member {last}: {damage}")
        )
    for member, entry_type in entries:
        if not _is_image_name(member):
            continue
        name = f"{location}!{member}"
        reason = _member_rejection(member, entry_type)
        if reason is None and counts[member] > 1:
            reason = f"rejected archive member: duplicate name ({counts[member]} entries)"
        if reason is not None:
            errors.append(ImageError(name, reason))
        elif not _is_hidden(member):
            items.append(SourceItem(name, location, member))
    items.sort(key=lambda item: item.name)
    return items, sorted(set(errors), key=lambda error: (error.path, error.reason))


def _member_rejection(member: str, entry_type: str | None) -> str | None:
    """Why an archive member must not be read, or None when it is a safe regular file."""
    if member.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(member):
        return "rejected archive member: absolute path"
    if ".." in member.replace("\\", "/").split("/"):
        return "rejected archive member: path traversal ('..')"
    if entry_type is not None:
        return f"rejected archive member: not a regular file ({entry_type})"
    return None


def _zip_entry_type(info: zipfile.ZipInfo) -> str | None:
    """None for a regular file, else what the entry is."""
    if info.is_dir():
        return "directory"
    if info.create_system == _ZIP_UNIX_SYSTEM:
        return _ZIP_ENTRY_TYPES.get(stat.S_IFMT(info.external_attr >> 16))
    return None


def _tar_entry_type(info: tarfile.TarInfo) -> str | None:
    """None for a regular file, else what the entry is."""
    if info.isreg():
        return None
    return _TAR_ENTRY_TYPES.get(info.type, "unsupported entry type")


def _zip_entries(file: BinaryIO) -> list[tuple[str, str | None]]:
    with zipfile.ZipFile(file) as archive:
        return [(info.filename, _zip_entry_type(info)) for info in archive.infolist()]


def _tar_entries(file: BinaryIO) -> tuple[list[tuple[str, str | None]], str | None]:
    """The members up to any damage, and what the damage is (None for a sound archive).

    In a compressed tar a member is only listed once its data decompressed to its end (the
    listing decompresses the archive once anyway), and in a plain tar once the header after
    it was read, so a member cut off by the damage is never listed."""
    entries: list[tuple[str, str | None]] = []
    previous = None
    try:
        with tarfile.open(fileobj=file, mode="r:*") as archive:
            compressed = archive.fileobj is not file
            for info in _tar_members(archive):
                if previous is not None:
                    entries.append(previous)
                previous = (info.name, _tar_entry_type(info))
                if compressed and info.isreg():  # decompress to its end: a cut one fails here
                    stream = archive.extractfile(info)
                    while stream is not None and stream.read(1 << 20):
                        pass
            if previous is not None:
                entries.append(previous)
    except _ARCHIVE_ERRORS as exc:
        if not entries and previous is None:
            raise
        return entries, f"{type(exc).__name__}: {exc}"
    return entries, None


def _tar_members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members in archive order, without tarfile keeping every TarInfo in memory."""
    while (info := archive.next()) is not None:
        archive.members.clear()
        yield info


def _read_limited(file: BinaryIO, size: int | None = None) -> bytes:
    """The bytes of ``file``; one over :data:`MAX_ITEM_BYTES` (by its known ``size``, before
    reading anything, or while reading) is refused with its size."""
    if size is not None and size > MAX_ITEM_BYTES:
        raise _Unreadable(_too_large(size))
    data = file.read(MAX_ITEM_BYTES + 1)
    if len(data) > MAX_ITEM_BYTES:
        raise _Unreadable(_too_large(None))
    return data


def _too_large(size: int | None) -> str:
    what = "more than the limit" if size is None else _size(size)
    return f"too large to read: {what} (the read limit is {_size(MAX_ITEM_BYTES)})"


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / 2**20:.1f} MiB ({n} bytes)"


def _read_file(location: str) -> bytes:
    size = None
    if "://" not in location:
        if (problem := entry_problem(location)) is not None:
            raise _Unreadable(problem)  # checked before open(): a FIFO would block it
        size = os.stat(location).st_size
    try:
        with _open_binary(location) as file:
            return _read_limited(file, size)
    except FileNotFoundError as exc:
        raise _Unreadable("file not found") from exc
    except IsADirectoryError as exc:
        raise _Unreadable("is a directory, not a file") from exc
    except PermissionError as exc:
        raise _Unreadable("permission denied") from exc
    except OSError as exc:
        raise _Unreadable(f"cannot read file: {exc}") from exc


def _open_archive_reader(
    location: str, wanted: Counter[str], stack: contextlib.ExitStack
) -> _ArchiveReader:
    """A reader for the archive; one whose every read fails if the archive cannot be opened."""
    try:
        file = stack.enter_context(_open_binary(location))
        if _archive_kind(location) == "zip":
            return _ZipReader(stack.enter_context(zipfile.ZipFile(file)))
        archive = stack.enter_context(tarfile.open(fileobj=file, mode="r:*"))  # noqa: SIM115
        if archive.fileobj is file:
            return _TarRandomReader(archive, wanted)
        return _TarStreamReader(archive, wanted)
    except FileNotFoundError:
        return _FailedArchive(f"archive not found: {location}")
    except _ARCHIVE_ERRORS as exc:
        return _FailedArchive(f"cannot open archive {location}: {exc}")


@contextlib.contextmanager
def _member_errors(member: str) -> Iterator[None]:
    """Turn errors from damaged archive data into _Unreadable."""
    try:
        yield
    except _ARCHIVE_ERRORS as exc:
        raise _Unreadable(f"cannot read archive member {member}: {exc}") from exc


def _check_member(member: str, entry_type: str | None) -> None:
    reason = _member_rejection(member, entry_type)
    if reason is not None:
        raise _Unreadable(reason)


class _FailedArchive:
    def __init__(self, reason: str) -> None:
        self._reason = reason

    def read(self, member: str) -> bytes:
        raise _Unreadable(self._reason)


class _ZipReader:
    """Random access to zip members."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self._archive = archive

    def read(self, member: str) -> bytes:
        _check_member(member, None)
        try:
            info = self._archive.getinfo(member)
        except KeyError as exc:
            raise _Unreadable("archive member not found") from exc
        _check_member(member, _zip_entry_type(info))
        with _member_errors(member), self._archive.open(info) as file:
            return _read_limited(file, info.file_size)


class _TarRandomReader:
    """Random access to members of an uncompressed tar: one header pass, then seeks."""

    def __init__(self, archive: tarfile.TarFile, wanted: Counter[str]) -> None:
        self._archive = archive
        self._members: dict[str, tarfile.TarInfo] = {}
        for info in _tar_members(archive):  # stops at the last wanted member
            if info.name in wanted:
                self._members.setdefault(info.name, info)
                if len(self._members) == len(wanted):
                    break

    def read(self, member: str) -> bytes:
        _check_member(member, None)
        info = self._members.get(member)
        if info is None:
            raise _Unreadable("archive member not found")
        _check_member(member, _tar_entry_type(info))
        with _member_errors(member):
            return _read_limited(self._archive.extractfile(info), info.size)


class _TarStreamReader:
    """Members of a compressed tar in one forward pass, buffering those read ahead of turn."""

    def __init__(self, archive: tarfile.TarFile, wanted: Counter[str]) -> None:
        self._archive = archive
        self._members = _tar_members(archive)
        self._remaining = Counter(wanted)
        self._ahead: dict[str, bytes | _Unreadable] = {}
        self._failure: str | None = None

    def read(self, member: str) -> bytes:
        _check_member(member, None)
        if member not in self._ahead:
            self._advance_to(member)
        self._remaining[member] -= 1
        result = self._ahead[member] if self._remaining[member] else self._ahead.pop(member)
        if isinstance(result, _Unreadable):
            raise result
        return result

    def _advance_to(self, target: str) -> None:
        """Read forward until ``target`` is in the buffer, storing the reason if it is not."""
        if self._failure is None:
            try:
                for info in self._members:
                    if self._remaining[info.name] and info.name not in self._ahead:
                        self._ahead[info.name] = self._take(info)
                        if info.name == target:
                            return
            except _ARCHIVE_ERRORS as exc:
                self._failure = f"archive is unreadable from this point on: {exc}"
        reason = self._failure or "archive member not found"
        self._ahead[target] = _Unreadable(reason)

    def _take(self, info: tarfile.TarInfo) -> bytes | _Unreadable:
        try:
            _check_member(info.name, _tar_entry_type(info))
            return _read_limited(self._archive.extractfile(info), info.size)
        except _Unreadable as exc:
            return exc
