"""Datasets and bad input: every kind of broken or unusual image file, indexing, subsets."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gig_dist import pipeline
from gig_dist.config import ConfigError
from gig_dist.data.images import SkippedImage, open_rgb
from gig_dist.data.sources import build_index
from gig_dist.store import PROCESSED, SKIPPED, MetaSection, RunStore
from tests.conftest import toy_config, zgroup


def _noise(mode: str, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(0)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return _noise("RGB", size).convert(mode)


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A valid small PNG whose header claims ``width`` x ``height``: decoding it would need
    gigabytes, reading its header does not."""
    _noise("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))


def _make_bad_and_odd_files(root: Path) -> dict[str, str | None]:
    """Writes files under root/<class>/ and returns name -> expected reason fragment (None: usable)."""
    good, odd = root / "good", root / "odd"
    good.mkdir(parents=True)
    odd.mkdir()
    expected: dict[str, str | None] = {}
    for i in range(3):
        _noise("RGB").save(good / f"rgb{i}.jpg")
        expected[f"rgb{i}.jpg"] = None
    _noise("L").save(odd / "gray.png")
    _noise("CMYK").save(odd / "cmyk.jpg")
    _noise("RGBA").save(odd / "rgba.png")
    _noise("P").save(odd / "palette.gif")
    Image.fromarray((np.arange(80 * 60).reshape(60, 80) * 10).astype(np.uint16)).save(odd / "gray16.png")
    expected.update({n: None for n in ("gray.png", "cmyk.jpg", "rgba.png", "palette.gif", "gray16.png")})

    (odd / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty file (0 bytes)"
    (odd / "notes.txt").write_text("this is not an image\n")
    expected["notes.txt"] = "not an image"
    (odd / "random.jpg").write_bytes(np.random.default_rng(1).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    expected["random.jpg"] = "not an image"
    _noise("RGB", (256, 256)).save(odd / "truncated.jpg", quality=95)
    full = (odd / "truncated.jpg").read_bytes()
    (odd / "truncated.jpg").write_bytes(full[: len(full) // 2])
    expected["truncated.jpg"] = "corrupt or truncated image"
    _noise("RGB", (64, 64)).save(odd / "corrupt.png")
    broken = bytearray((odd / "corrupt.png").read_bytes())
    idat = broken.index(b"IDAT") + 4
    broken[idat : idat + 200] = bytes(200)  # zero the compressed stream
    (odd / "corrupt.png").write_bytes(bytes(broken))
    expected["corrupt.png"] = "corrupt or truncated image"
    _png_claiming_size(odd / "huge.png", 100_000, 100_000)
    expected["huge.png"] = "too large: over PIL's limit"
    return expected


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_unusual_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("img.jpg" if mode in ("L", "CMYK") else "img.png")
    image = _noise("RGB") if mode != "I;16" else None
    if mode == "I;16":
        Image.fromarray(np.full((60, 80), 40000, dtype=np.uint16)).save(path)
    else:
        image.convert(mode).save(path)
    rgb = open_rgb(str(path), 10**8)
    assert rgb.mode == "RGB" and rgb.size == (80, 60)


def test_pixel_limit_is_configurable(tmp_path):
    _noise("RGB", (200, 200)).save(tmp_path / "a.png")
    assert open_rgb(str(tmp_path / "a.png"), 40_000).size == (200, 200)
    with pytest.raises(SkippedImage, match="40000 pixels exceeds dataset.max_image_pixels = 39999"):
        open_rgb(str(tmp_path / "a.png"), 39_999)


def test_huge_image_within_pil_limit_hits_ours(tmp_path):
    _png_claiming_size(tmp_path / "big.png", 12_000, 12_000)  # 144M pixels: PIL only warns
    with pytest.raises(SkippedImage, match="too large: 12000x12000 = 144000000 pixels exceeds"):
        open_rgb(str(tmp_path / "big.png"), 89_478_485)


def test_missing_file_is_a_skip_reason(tmp_path):
    with pytest.raises(SkippedImage, match="file not found"):
        open_rgb(str(tmp_path / "gone.jpg"), 10**8)


def test_bad_images_are_skipped_recorded_and_the_run_goes_on(tmp_path):
    expected = _make_bad_and_odd_files(tmp_path / "data")
    config = toy_config(
        "dataset.kind=imagefolder", f"dataset.path={tmp_path / 'data'}", "store.images_per_unit=8",
        "store.images_per_chunk=4",
    )
    report = pipeline.run(config, tmp_path / "run.zarr", until="sample")
    store = RunStore.open(report.url)
    paths, labels = store.family(MetaSection).read_index(store.units()[0])
    all_paths = [str(p) for p in zgroup(store)["meta/path"][:]]
    status = zgroup(store)["meta/status"][:]
    reasons = [str(r) for r in zgroup(store)["meta/skip_reason"][:]]
    assert len(all_paths) == len(expected)
    for path, state, reason in zip(all_paths, status, reasons):
        fragment = expected[Path(path).name]
        if fragment is None:
            assert state == PROCESSED and reason == "", path
        else:
            assert state == SKIPPED and fragment in reason, (path, reason)

    bad = [n for n, r in expected.items() if r is not None]
    counts = store.family(MetaSection).image_counts()
    assert counts == {"total": len(expected), "processed": len(expected) - len(bad), "skipped": len(bad), "pending": 0}
    assert [r.skipped for r in report.stages] == [len(bad), len(bad)]  # extract, sample
    assert sorted(Path(s["path"]).name for s in store.family(MetaSection).skipped_images()) == sorted(bad)

    logits = zgroup(store)["meta/logits"][:]
    assert np.isfinite(logits[status == PROCESSED]).all() and np.isnan(logits[status == SKIPPED]).all()
    assert (zgroup(store)["meta/prediction"][:][status == SKIPPED] == -1).all()
    pfv = zgroup(store)["pfv/layer3.1/value"][:]
    assert np.isnan(pfv[status == SKIPPED]).all() and np.isfinite(pfv[status == PROCESSED]).all()
    # ImageFolder classes follow sorted class folders (good, odd); they are not the toy model's
    # 8 outputs, so labels are not used as outputs and the images are grouped by prediction.
    assert store.facts.dataset_classes == ["good", "odd"] and store.facts.label_source == "prediction"
    assert (zgroup(store)["meta/label"][:] == -1).all()


def test_missing_dataset_path_fails_before_any_work(tmp_path):
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="no such directory"):
        pipeline.run(config, tmp_path / "run.zarr", until="sample")
    assert not (tmp_path / "run.zarr").exists()


def test_empty_dataset_fails_before_any_work(tmp_path):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={tmp_path / 'data'}")
    with pytest.raises(ConfigError, match="is empty: no images"):
        pipeline.run(config, tmp_path / "run.zarr", until="sample")
    assert not (tmp_path / "run.zarr").exists()


def test_filelist_with_labels_comments_and_relative_paths(tmp_path):
    _noise("RGB").save(tmp_path / "a.jpg")
    _noise("RGB").save(tmp_path / "b c.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("# images\na.jpg,3\n\nb c.jpg 5  # spaces in names work\nmissing.jpg\n")
    config = toy_config("dataset.kind=filelist", f"dataset.path={listing}")
    index = build_index(config.dataset)
    assert index.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b c.jpg"), str(tmp_path / "missing.jpg")]
    assert index.labels.tolist() == [3, 5, -1]
    store = RunStore.open(pipeline.run(config, tmp_path / "run.zarr", until="sample").url)
    assert store.family(MetaSection).image_counts()["skipped"] == 1
    assert store.family(MetaSection).skipped_images()[0]["reason"] == "file not found"


def test_filelist_bad_label_names_the_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg,1\nb.jpg,cat\n")
    with pytest.raises(ConfigError, match=r"list.txt:2: label 'cat' is not an integer"):
        build_index(toy_config("dataset.kind=filelist", f"dataset.path={listing}").dataset)


def test_flat_folder_is_read_unlabelled(tmp_path):
    for name in ("x.png", "y.png"):
        _noise("RGB").save(tmp_path / name)
    index = build_index(toy_config("dataset.kind=imagefolder", f"dataset.path={tmp_path}").dataset)
    assert len(index) == 2 and index.labels.tolist() == [-1, -1] and index.class_names == []


def test_stride_then_limit():
    listed = build_index(toy_config("dataset.toy.num_images=100", "dataset.stride=7", "dataset.limit=5",
                                    "dataset.order=listed").dataset)
    assert [int(p.split("/")[-2]) for p in listed.paths] == [0, 7, 14, 21, 28]
    # interleaved (the default): the stride's images, one class at a time, then the limit
    index = build_index(toy_config("dataset.toy.num_images=100", "dataset.stride=7", "dataset.limit=5").dataset)
    assert all(int(p.split("/")[-2]) % 7 == 0 for p in index.paths)
    assert len(set(index.labels.tolist())) == 5


def test_a_thin_image_is_skipped_before_its_resize_blows_up(tmp_path):
    # A 1 x 100,000 strip (300 KB) used to be resized to 72 x 7,200,000 and took 2.8 GB of RSS.
    Image.fromarray(np.zeros((1, 100_000, 3), dtype=np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(SkippedImage, match=r"too thin: 100000x1 has an aspect ratio over 20:1"):
        open_rgb(str(tmp_path / "strip.png"), 89_478_485)
    _noise("RGB", (600, 100)).save(tmp_path / "panorama.png")  # 6:1 is an ordinary panorama
    assert open_rgb(str(tmp_path / "panorama.png"), 89_478_485).size == (600, 100)


def test_symlinked_folders_are_read_once_and_never_relabel(tmp_path):
    import os

    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    for i in range(3):
        _noise("RGB").save(root / "cat" / f"{i}.png")
    _noise("RGB").save(root / "dog" / "0.png")
    os.symlink(".", root / "cat" / "self")  # a loop: 3 images became 124 entries
    os.symlink("..", root / "dog" / "up")  # the parent: cat's images were read again as dogs
    (tmp_path / "extra").mkdir()
    _noise("RGB").save(tmp_path / "extra" / "e.png")
    os.symlink(tmp_path / "extra", root / "dog" / "more")  # out of the dataset: not walked (issue 22)
    (tmp_path / "birds").mkdir()
    _noise("RGB").save(tmp_path / "birds" / "b.png")
    os.symlink(tmp_path / "birds", root / "bird")  # a class folder may be a link (a subset made of links)
    with pytest.warns(UserWarning) as caught:
        index = build_index(toy_config("dataset.kind=imagefolder", f"dataset.path={root}").dataset)
    messages = [str(w.message) for w in caught]
    assert any("2 symlinked folders lead to folders already in the dataset" in m for m in messages), messages
    assert any(f"1 symlinked folders inside class folders lead out of the dataset and were not followed: "
               f"{root / 'dog' / 'more'} -> {tmp_path / 'extra'}" in m for m in messages), messages
    names = sorted((Path(p).parent.name, Path(p).name, label) for p, label in zip(index.paths, index.labels))
    assert names == [("bird", "b.png", 0), ("cat", "0.png", 1), ("cat", "1.png", 1), ("cat", "2.png", 1),
                     ("dog", "0.png", 2)]


def test_a_walk_never_leaves_the_dataset_and_kernel_filesystems_are_refused(tmp_path):
    """dataset.path=/proc followed /proc/*/cwd into the whole filesystem and crashed after 34 s."""
    import os

    with pytest.raises(ConfigError, match="is in /proc, a virtual filesystem of the kernel"):
        build_index(toy_config("dataset.kind=imagefolder", "dataset.path=/proc").dataset)
    root = tmp_path / "data"
    (root / "cls").mkdir(parents=True)
    _noise("RGB").save(root / "cls" / "a.png")
    os.symlink("/", root / "cls" / "everything")
    with pytest.warns(UserWarning, match=r"lead out of the dataset and were not followed: .*everything -> /"):
        index = build_index(toy_config("dataset.kind=imagefolder", f"dataset.path={root}").dataset)
    assert [Path(p).name for p in index.paths] == ["a.png"]


def test_a_header_that_pil_misreads_skips_that_image_naming_why(tmp_path):
    """An IM image whose size reads ``24*2.`` raised TypeError out of open_rgb, and every rerun
    then failed its unit without naming the file."""
    Image.fromarray(np.zeros((2, 24, 3), np.uint8)).save(tmp_path / "a.im")
    (tmp_path / "a.im").write_bytes((tmp_path / "a.im").read_bytes().replace(b"24*2", b"24*2.", 1))
    with pytest.raises(SkippedImage, match="cannot decode: TypeError"):
        open_rgb(str(tmp_path / "a.im"), 10**8)


def _seed_files(folder: Path) -> list[Path]:
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    saved = []
    for name, args in [("a.png", {}), ("a.jpg", {"quality": 90}), ("a.gif", {}), ("a.bmp", {}), ("a.tiff", {}),
                       ("a.webp", {}), ("a.im", {}), ("a.ppm", {}), ("a.tga", {}), ("a.pcx", {})]:
        image.save(folder / name, **args)
        saved.append(folder / name)
    Image.fromarray((rng.integers(0, 65535, (24, 32))).astype(np.uint16)).save(folder / "g16.png")
    image.convert("P").save(folder / "p.png")
    return saved + [folder / "g16.png", folder / "p.png"]


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    kind = rng.integers(0, 6)
    if kind == 0:  # flip bytes, mostly in the header
        for _ in range(rng.integers(1, 8)):
            at = int(rng.integers(0, min(len(data), 64) if rng.random() < 0.7 else len(data)))
            data[at] = int(rng.integers(0, 256))
    elif kind == 1:  # truncate
        data = data[: int(rng.integers(1, len(data)))]
    elif kind == 2:  # insert junk
        at = int(rng.integers(0, len(data)))
        data[at:at] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
    elif kind == 3:  # digits and punctuation where sizes are written
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(0, min(len(data), 80)))
            data[at] = ord(rng.choice(list("0123456789.*-+ e\r\n")))
    elif kind == 4:  # a field of large values
        at = int(rng.integers(0, min(len(data), 40)))
        data[at : at + 4] = b"\xff\xff\xff\x7f"
    else:  # a number in a text header becomes a decimal ("24*2" -> "24*2.")
        digits = [i for i in range(min(len(data), 120) - 1) if chr(data[i]).isdigit() and not chr(data[i + 1]).isdigit()]
        if digits:
            data.insert(int(rng.choice(digits)) + 1, ord("."))
    return bytes(data)


@pytest.mark.timeout(300)
def test_open_rgb_decodes_or_skips_every_mutated_image_and_never_raises_anything_else(tmp_path):
    """400 seeded mutations of 12 kinds of image file: each is an RGB image or a SkippedImage."""
    seeds = _seed_files(tmp_path)
    rng = np.random.default_rng(22)
    outcomes = {"decoded": 0, "skipped": 0}
    for case in range(400):
        seed = seeds[case % len(seeds)]
        path = tmp_path / f"case{case}{seed.suffix}"
        path.write_bytes(_mutate(seed.read_bytes(), rng))
        try:
            image = open_rgb(str(path), 4096 * 4096)
        except SkippedImage as exc:
            assert str(exc), case
            outcomes["skipped"] += 1
            continue
        except Exception as exc:  # the point of the test: nothing else gets out
            pytest.fail(f"case {case} ({seed.name}): {type(exc).__name__}: {exc}")
        assert image.mode == "RGB" and min(image.size) >= 1
        outcomes["decoded"] += 1
    assert outcomes["decoded"] > 50 and outcomes["skipped"] > 50, outcomes  # both paths exercised


def test_special_files_are_named_as_such_and_never_opened(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would wait for a writer forever
    with pytest.raises(SkippedImage, match="not a regular file: a FIFO"):
        open_rgb(str(tmp_path / "pipe.jpg"), 10**8)
    with pytest.raises(SkippedImage, match="not a regular file: a character device"):
        open_rgb("/dev/zero", 10**8)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(SkippedImage, match="not a regular file: a directory"):
        open_rgb(str(tmp_path / "folder.png"), 10**8)


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(values).save(tmp_path / "g16.png")
    pixels = np.asarray(open_rgb(str(tmp_path / "g16.png"), 10**8))
    assert np.array_equal(pixels[..., 0], np.round(values / 257).astype(np.uint8))
    assert (pixels == 255).mean() < 0.01  # clipped, 99.6 % were 255
    Image.fromarray(values.astype(np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(SkippedImage, match="floating-point pixels"):
        open_rgb(str(tmp_path / "f.tiff"), 10**8)


def test_a_file_name_that_is_not_utf8_is_read_stored_and_shown(tmp_path):
    """A name with a Latin-1 byte made the whole dataset unusable (UnicodeEncodeError in the
    index's fingerprint)."""
    import os

    root = tmp_path / "data"
    (root / "cls").mkdir(parents=True)
    _noise("RGB").save(root / "cls" / "ok.png")
    name = os.fsdecode(b"caf\xe9.png")
    _noise("RGB").save(os.path.join(root, "cls", name), format="PNG")
    config = toy_config("dataset.kind=imagefolder", f"dataset.path={root}", "store.images_per_unit=2",
                        "store.images_per_chunk=1")
    report = pipeline.run(config, tmp_path / "run.zarr", until="extract")
    store = RunStore.open(report.url)
    assert store.family(MetaSection).image_counts()["processed"] == 2
    stored = sorted(str(p) for p in zgroup(store)["meta/path"][:])
    assert stored[1].startswith("fsbytes:") and stored[1].endswith("/cls/caf%E9.png")
    assert sorted(store.family(MetaSection).read_index(store.units()[0])[0]) == sorted(
        [str(root / "cls" / "ok.png"), os.path.join(root, "cls", name)])
    assert pipeline.run(config, tmp_path / "run.zarr", until="extract").stages[0].units_run == 0  # same fingerprint
    from gig_dist.data.files import shown

    assert shown(name) == "caf\ufffd.png"
