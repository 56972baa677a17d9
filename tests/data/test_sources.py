"""gaussian_ad.data.sources: listing and reading folders, globs, archives and fsspec URLs."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from gaussian_ad.data import sources
from gaussian_ad.data.images import ImageError, load_rgb
from gaussian_ad.data.sources import SourceItem, list_source, read_items

TAR_MODES = {
    ".tar": "w",
    ".tar.gz": "w:gz",
    ".tgz": "w:gz",
    ".tar.bz2": "w:bz2",
    ".tar.xz": "w:xz",
}


def png_bytes(seed: int, size: int = 6) -> bytes:
    """A small random RGB PNG (random pixels: it does not compress)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(load_rgb(data))


def write_tar(path: Path, members: dict[str, bytes], mode: str | None = None) -> Path:
    """A tar of regular files; the compression follows the suffix unless ``mode`` is given."""
    suffix = next(s for s in sorted(TAR_MODES, key=len, reverse=True) if path.name.endswith(s))
    with tarfile.open(path, mode or TAR_MODES[suffix]) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def add_tar_entry(archive: tarfile.TarFile, name: str, entry_type: bytes, target: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = entry_type
    info.linkname = target
    archive.addfile(info)


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def read_all(items: list[SourceItem]) -> list[bytes | ImageError]:
    return [result for _, result in read_items(items)]


@pytest.fixture
def images() -> dict[str, bytes]:
    """Four small PNGs by letter."""
    return {name: png_bytes(seed) for seed, name in enumerate(["a", "b", "c", "d"])}


def as_members(images: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{letter}.png": data for letter, data in images.items()}


@pytest.fixture
def memory_root(tmp_path: Path):
    """A fresh memory:// folder, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"memory://{tmp_path.name}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_folder_is_listed_recursively_images_only_sorted(tmp_path: Path, images) -> None:
    root = tmp_path / "root"
    files = {
        "sub/deep/c.png": images["c"],
        "a.png": images["a"],
        "sub/b.PNG": images["b"],
        "notes.txt": b"not an image",
        "sub/data.csv": b"1,2",
        ".hidden.png": images["d"],
        ".cache/d.png": images["d"],
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)

    items, errors = list_source(root)

    expected = [str(root / n) for n in ["a.png", "sub/b.PNG", "sub/deep/c.png"]]
    assert [item.name for item in items] == expected
    assert all(item.location == item.name and item.member is None for item in items)
    assert errors == []
    decoded = [pixels(data) for data in read_all(items)]
    for array, name in zip(decoded, ["a", "b", "c"], strict=True):
        np.testing.assert_array_equal(array, pixels(images[name]))


def test_glob_and_single_file(tmp_path: Path, images) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(images["a"])
    (tmp_path / "sub" / "b.png").write_bytes(images["b"])
    (tmp_path / "sub" / "c.jpg.txt").write_bytes(b"text")

    recursive, _ = list_source(str(tmp_path / "**" / "*.png"))
    flat, _ = list_source(f"{tmp_path}/*.png")
    single, _ = list_source(tmp_path / "sub" / "b.png")
    nothing, _ = list_source(f"{tmp_path}/*.bmp")

    assert [i.name for i in recursive] == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png")]
    assert [i.name for i in flat] == [str(tmp_path / "a.png")]
    assert single == [SourceItem(str(tmp_path / "sub/b.png"), str(tmp_path / "sub/b.png"))]
    assert nothing == []
    np.testing.assert_array_equal(pixels(read_all(single)[0]), pixels(images["b"]))


@pytest.mark.parametrize("suffix", list(TAR_MODES))
def test_tar_members_are_listed_and_read(tmp_path: Path, images, suffix: str) -> None:
    members = {
        "imgs/sub/b.png": images["b"],
        "imgs/a.png": images["a"],
        "./c.PNG": images["c"],
        "imgs/readme.txt": b"text",
        "imgs/.hidden/d.png": images["d"],
    }
    archive = write_tar(tmp_path / f"data{suffix}", members)

    items, errors = list_source(archive)

    assert errors == []
    assert [i.member for i in items] == ["./c.PNG", "imgs/a.png", "imgs/sub/b.png"]
    assert [i.name for i in items] == [f"{archive}!{i.member}" for i in items]
    assert {i.location for i in items} == {str(archive)}
    for item, data in read_items(items):
        np.testing.assert_array_equal(pixels(data), pixels(members[item.member]))


def test_zip_members_are_listed_and_read(tmp_path: Path, images) -> None:
    members = {
        "imgs/sub/b.png": images["b"],
        "imgs/a.JPEG.png": images["a"],
        "imgs/readme.txt": b"text",
        "__MACOSX/imgs/._a.png": b"apple double",
    }
    archive = write_zip(tmp_path / "data.ZIP", members)

    items, errors = list_source(archive)

    assert errors == []
    assert [i.name for i in items] == [f"{archive}!imgs/a.JPEG.png", f"{archive}!imgs/sub/b.png"]
    for item, data in read_items(items):
        np.testing.assert_array_equal(pixels(data), pixels(members[item.member]))


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_unsafe_tar_members_are_rejected_and_never_read(
    tmp_path: Path, images, suffix: str
) -> None:
    path = tmp_path / f"evil{suffix}"
    with tarfile.open(path, TAR_MODES[suffix]) as archive:
        for name, data in {
            "ok.png": images["a"],
            "../evil.png": images["b"],
            "/etc/evil.png": images["b"],
            "imgs/../../evil2.png": images["b"],
            "twice.png": images["c"],
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        add_tar_entry(archive, "link.png", tarfile.SYMTYPE, "ok.png")
        add_tar_entry(archive, "hard.png", tarfile.LNKTYPE, "ok.png")
        add_tar_entry(archive, "folder.png", tarfile.DIRTYPE)
        add_tar_entry(archive, "device.png", tarfile.CHRTYPE)
        info = tarfile.TarInfo("twice.png")
        info.size = len(images["d"])
        archive.addfile(info, io.BytesIO(images["d"]))

    items, errors = list_source(path)

    assert [i.member for i in items] == ["ok.png"]
    rejected = "rejected archive member: "
    assert errors == [
        ImageError(f"{path}!../evil.png", rejected + "path traversal ('..')"),
        ImageError(f"{path}!/etc/evil.png", rejected + "absolute path"),
        ImageError(f"{path}!device.png", rejected + "not a regular file (character device)"),
        ImageError(f"{path}!folder.png", rejected + "not a regular file (directory)"),
        ImageError(f"{path}!hard.png", rejected + "not a regular file (hard link)"),
        ImageError(f"{path}!imgs/../../evil2.png", rejected + "path traversal ('..')"),
        ImageError(f"{path}!link.png", rejected + "not a regular file (symlink)"),
        ImageError(f"{path}!twice.png", rejected + "duplicate name (2 entries)"),
    ]
    forged = [SourceItem(f"{path}!{m}", str(path), m) for m in ["../evil.png", "link.png"]]
    results = read_all([*items, *forged])
    np.testing.assert_array_equal(pixels(results[0]), pixels(images["a"]))
    assert results[1:] == [
        ImageError(f"{path}!../evil.png", rejected + "path traversal ('..')"),
        ImageError(f"{path}!link.png", rejected + "not a regular file (symlink)"),
    ]


def test_unsafe_zip_members_are_rejected_and_never_read(tmp_path: Path, images) -> None:
    path = write_zip(
        tmp_path / "evil.zip",
        {
            "ok.png": images["a"],
            "../evil.png": images["b"],
            "..\\evil2.png": images["b"],
            "C:/evil.png": images["b"],
        },
    )
    with zipfile.ZipFile(path, "a") as archive:
        link = zipfile.ZipInfo("link.png")
        link.create_system = 3
        link.external_attr = 0o120777 << 16  # S_IFLNK | 0777
        archive.writestr(link, "ok.png")
        archive.writestr(zipfile.ZipInfo("folder.png/"), b"")

    items, errors = list_source(path)

    assert [i.member for i in items] == ["ok.png"]
    rejected = "rejected archive member: "
    assert errors == [
        ImageError(f"{path}!../evil.png", rejected + "path traversal ('..')"),
        ImageError(f"{path}!..\\evil2.png", rejected + "path traversal ('..')"),
        ImageError(f"{path}!C:/evil.png", rejected + "absolute path"),
        ImageError(f"{path}!folder.png/", rejected + "not a regular file (directory)"),
        ImageError(f"{path}!link.png", rejected + "not a regular file (symlink)"),
    ]
    forged = [SourceItem(f"{path}!{m}", str(path), m) for m in ["../evil.png", "link.png"]]
    assert read_all(forged) == [
        ImageError(f"{path}!../evil.png", rejected + "path traversal ('..')"),
        ImageError(f"{path}!link.png", rejected + "not a regular file (symlink)"),
    ]


def test_memory_filesystem_by_folder_and_glob_url(memory_root: str, images) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_root}/imgs/a.png", images["a"])
    fs.pipe(f"{memory_root}/imgs/sub/b.png", images["b"])
    fs.pipe(f"{memory_root}/imgs/notes.txt", b"text")
    fs.pipe(f"{memory_root}/imgs/.hidden/c.png", images["c"])
    bucket = memory_root.removeprefix("memory://")
    expected = [f"memory:///{bucket}/imgs/a.png", f"memory:///{bucket}/imgs/sub/b.png"]

    by_folder, errors = list_source(f"{memory_root}/imgs")
    by_glob, _ = list_source(f"{memory_root}/imgs/**/*.png")
    flat_glob, _ = list_source(f"{memory_root}/imgs/*.png")
    single, _ = list_source(f"{memory_root}/imgs/sub/b.png")

    assert [i.name for i in by_folder] == expected
    assert errors == []
    assert by_glob == by_folder
    assert [i.name for i in flat_glob] == expected[:1]
    assert [i.name for i in single] == expected[1:]
    decoded = [pixels(data) for data in read_all(by_folder)]
    np.testing.assert_array_equal(decoded[0], pixels(images["a"]))
    np.testing.assert_array_equal(decoded[1], pixels(images["b"]))


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz"])
def test_archive_behind_an_fsspec_url(
    tmp_path: Path, memory_root: str, images, suffix: str
) -> None:
    members = {"x/a.png": images["a"], "x/b.png": images["b"]}
    local = tmp_path / f"data{suffix}"
    write_zip(local, members) if suffix == ".zip" else write_tar(local, members)
    fsspec.filesystem("memory").pipe(f"{memory_root}/data{suffix}", local.read_bytes())

    items, errors = list_source(f"{memory_root}/data{suffix}")

    location = f"memory:///{memory_root.removeprefix('memory://')}/data{suffix}"
    assert errors == []
    assert [i.name for i in items] == [f"{location}!x/a.png", f"{location}!x/b.png"]
    for item, data in read_items(items):
        np.testing.assert_array_equal(pixels(data), pixels(members[item.member]))


def test_file_url_lists_a_local_folder(tmp_path: Path, images) -> None:
    (tmp_path / "a.png").write_bytes(images["a"])

    items, _ = list_source(f"file://{tmp_path}")

    assert [i.name for i in items] == [f"file://{tmp_path}/a.png"]
    np.testing.assert_array_equal(pixels(read_all(items)[0]), pixels(images["a"]))


def test_read_items_keeps_order_and_reports_unreadable_items(
    tmp_path: Path, memory_root: str, images
) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(images["a"])
    (tmp_path / "folder" / "gone.png").write_bytes(images["a"])
    zip_path = write_zip(
        tmp_path / "data.zip", {"b.png": images["b"], "c.png": images["c"], "gone.png": b"x"}
    )
    tgz_path = write_tar(tmp_path / "data.tgz", {"d.png": images["d"], "gone.png": b"x"})
    fsspec.filesystem("memory").pipe(f"{memory_root}/m.png", images["c"])
    listed = {
        i.name.rsplit("/", 1)[-1]: i
        for source in [tmp_path / "folder", zip_path, tgz_path, f"{memory_root}/m.png"]
        for i in list_source(source)[0]
    }
    zip_gone, tgz_gone = listed.pop("data.zip!gone.png"), listed.pop("data.tgz!gone.png")
    # After listing: a file is deleted, members disappear, and one zip member is corrupted.
    (tmp_path / "folder" / "gone.png").unlink()
    raw = bytearray(write_zip(zip_path, {"b.png": images["b"], "c.png": images["c"]}).read_bytes())
    offset = raw.index(images["c"]) + 40
    raw[offset] ^= 0xFF
    zip_path.write_bytes(bytes(raw))
    write_tar(tgz_path, {"d.png": images["d"]})
    order = ["m.png", "data.tgz!d.png", "gone.png", "data.zip!c.png", "a.png", "data.zip!b.png"]
    items = [listed[key] for key in order]
    items[4:4] = [zip_gone, tgz_gone]

    results = list(read_items(items))

    assert [item for item, _ in results] == items
    by_name = {item.name.rsplit("/", 1)[-1]: result for item, result in results}
    for key, image in [("m.png", "c"), ("data.tgz!d.png", "d"), ("a.png", "a")]:
        np.testing.assert_array_equal(pixels(by_name[key]), pixels(images[image]))
    np.testing.assert_array_equal(pixels(by_name["data.zip!b.png"]), pixels(images["b"]))
    assert by_name["gone.png"] == ImageError(str(tmp_path / "folder/gone.png"), "file not found")
    assert by_name["data.zip!gone.png"] == ImageError(zip_gone.name, "archive member not found")
    assert by_name["data.tgz!gone.png"] == ImageError(tgz_gone.name, "archive member not found")
    corrupt = by_name["data.zip!c.png"]
    assert isinstance(corrupt, ImageError)
    assert corrupt.reason.startswith("cannot read archive member c.png") and "CRC" in corrupt.reason


def test_each_archive_is_opened_once_per_call(tmp_path: Path, images, monkeypatch) -> None:
    zip_items, _ = list_source(write_zip(tmp_path / "a.zip", as_members(images)))
    tar_items, _ = list_source(write_tar(tmp_path / "a.tar", as_members(images)))
    tgz_items, _ = list_source(write_tar(tmp_path / "a.tar.gz", as_members(images)))
    opened: list[str] = []
    open_binary = sources._open_binary
    monkeypatch.setattr(
        sources, "_open_binary", lambda location: opened.append(location) or open_binary(location)
    )
    mixed = [item for trio in zip(zip_items, tar_items, tgz_items, strict=True) for item in trio]

    results = read_all(mixed)

    assert all(isinstance(result, bytes) for result in results)
    assert sorted(opened) == sorted(str(tmp_path / n) for n in ["a.zip", "a.tar", "a.tar.gz"])


def test_compressed_tar_members_in_any_order_and_repeated(tmp_path: Path, images) -> None:
    members = as_members(images)
    items, _ = list_source(write_tar(tmp_path / "data.tar.xz", members))
    requested = [*reversed(items), items[-1], items[0]]

    results = read_all(requested)

    assert results == [members[item.member] for item in requested]


def test_truncated_compressed_tar_fails_from_the_cut_on(tmp_path: Path) -> None:
    members = {f"{n}.png": png_bytes(n, size=64) for n in range(6)}
    path = write_tar(tmp_path / "data.tar.gz", members)
    items, _ = list_source(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    results = read_all(items)

    assert results[0] == members["0.png"]
    assert isinstance(results[-1], ImageError)
    assert results[-1].reason.startswith("archive is unreadable from this point on")


def test_listing_is_deterministic(tmp_path: Path, images) -> None:
    for name, data in images.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        (tmp_path / "imgs" / name / f"{name}.png").write_bytes(data)
    archive = write_tar(tmp_path / "data.tar.gz", {f"z/{n}.png": d for n, d in images.items()})

    assert list_source(tmp_path / "imgs") == list_source(tmp_path / "imgs")
    assert list_source(archive) == list_source(archive)
    assert len(list_source(archive)[0]) == 4


def test_missing_sources_raise_file_not_found_naming_them(tmp_path: Path, memory_root) -> None:
    with pytest.raises(FileNotFoundError, match="image source not found: .*nope"):
        list_source(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="image source not found: .*nope.zip"):
        list_source(tmp_path / "nope.zip")
    with pytest.raises(FileNotFoundError, match=f"image source not found: {memory_root}/nope"):
        list_source(f"{memory_root}/nope")


@pytest.mark.parametrize("name", ["bad.zip", "bad.tar", "bad.tar.gz", "bad.tar.xz"])
def test_corrupt_archive_raises_value_error_naming_it(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not an archive at all" * 40)

    with pytest.raises(ValueError, match=f"cannot read archive .*{name}"):
        list_source(tmp_path / name)


def test_truncated_zip_raises_value_error(tmp_path: Path) -> None:
    members = {f"{n}.png": png_bytes(n, size=64) for n in range(3)}
    path = write_zip(tmp_path / "cut.zip", members)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])

    with pytest.raises(ValueError, match="cannot read archive .*cut.zip"):
        list_source(path)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_truncated_tar_lists_the_members_before_the_damage(tmp_path: Path, suffix: str) -> None:
    members = {f"{n}.png": png_bytes(n, size=64) for n in range(3)}
    path = write_tar(tmp_path / f"cut{suffix}", members)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])

    items, errors = list_source(path)

    assert 0 < len(items) < len(members)
    assert [item.member for item in items] == list(members)[: len(items)]
    (error,) = errors  # one error row for the archive, naming the last sound member
    assert error.path == str(path)
    assert error.reason.startswith(f"archive truncated or damaged after member {items[-1].member}")
    assert read_all(items) == [members[item.member] for item in items]


def test_tar_cut_before_its_first_member_raises_value_error(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "cut.tar.gz", {"0.png": png_bytes(0, size=64)})
    path.write_bytes(path.read_bytes()[:40])

    with pytest.raises(ValueError, match="cannot read archive .*cut.tar.gz"):
        list_source(path)


def test_unreadable_archive_at_read_time_fails_each_of_its_items(tmp_path: Path, images) -> None:
    path = write_zip(tmp_path / "data.zip", as_members(images))
    items, _ = list_source(path)
    path.unlink()

    assert read_all(items[:2]) == [
        ImageError(item.name, f"archive not found: {path}") for item in items[:2]
    ]


def test_other_invalid_sources_raise_value_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("text")

    with pytest.raises(ValueError, match="not an image file or a supported archive: .*notes"):
        list_source(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="chained fsspec URLs are not supported"):
        list_source(f"zip://*.png::file://{tmp_path}/a.zip")


def test_items_over_the_read_limit_are_not_read(
    tmp_path: Path, images, memory_root, monkeypatch
) -> None:
    big = b"\0" * (3 << 20)
    (tmp_path / "a.png").write_bytes(images["a"])
    (tmp_path / "big.png").write_bytes(big)
    archive = write_zip(tmp_path / "a.zip", {"a.png": images["a"], "big.png": big})
    fsspec.filesystem("memory").pipe_file(f"{memory_root}/big.png", big)
    items = [
        *list_source(tmp_path)[0],
        *list_source(archive)[0],
        *list_source(f"{memory_root}/big.png")[0],
    ]
    assert [item.name.rsplit("/", 1)[-1] for item in items] == [
        "a.png",
        "big.png",
        "a.zip!a.png",
        "a.zip!big.png",
        "big.png",
    ]
    monkeypatch.setattr(sources, "MAX_ITEM_BYTES", 2 << 20)

    results = read_all(items)

    # Files and archive members are refused by their size, a URL of unknown size while read.
    limit = "the read limit is 2.0 MiB (2097152 bytes)"
    by_size = f"too large to read: 3.0 MiB (3145728 bytes) ({limit})"
    unknown_size = f"too large to read: more than the limit ({limit})"
    assert results[0] == images["a"] and results[2] == images["a"]
    assert [r.reason for r in (results[1], results[3], results[4])] == [
        by_size,
        by_size,
        unknown_size,
    ]
