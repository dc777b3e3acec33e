"""Tests of hetplugin.core.mrc: volumes, stacks, memory-mapped reading and image checks."""
from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from hetplugin.core import mrc
from hetplugin.core.mrc import (StackReader, check_images, close_all, open_stack, read_header, read_volume,
                                write_stack, write_volume)
from hetplugin.core.starfile import read_particles

DATA = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA} "
                                "(real files live beside the project, not in it)")


@pytest.fixture(autouse=True)
def _release_handles():
    yield
    close_all()


def test_volume_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(12, 12, 12)).astype(np.float32)
    write_volume(tmp_path / "v.mrc", volume, 1.7)
    back, pixel = read_volume(str(tmp_path / "v.mrc") + ":mrc")
    assert back.dtype == np.float32 and back.shape == (12, 12, 12) and back.flags.writeable
    assert np.array_equal(back, volume) and pixel == pytest.approx(1.7)
    with mrcfile.open(tmp_path / "v.mrc") as handle:
        assert handle.header.ispg == 1 and float(handle.header.origin.x) == 0.0
    write_volume(tmp_path / "v.map", volume.astype(np.float64), 2.0)
    assert read_volume(tmp_path / "v.map")[1] == pytest.approx(2.0)


def test_volume_axis_order_and_missing_pixel_size(tmp_path):
    volume = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    with mrcfile.new(tmp_path / "swapped.mrc") as handle:   # columns along z: data stored (x, y, z)
        handle.set_data(np.ascontiguousarray(volume.transpose(2, 1, 0)))
        handle.header.mapc, handle.header.mapr, handle.header.maps = 3, 2, 1
    back, pixel = read_volume(tmp_path / "swapped.mrc")
    assert np.array_equal(back, volume) and pixel is None


def test_volume_errors_name_the_file(tmp_path):
    write_stack(tmp_path / "flat.mrcs", np.zeros((3, 8, 8), np.float32), 1.0)
    with pytest.raises(ValueError, match=r"flat\.mrcs.*cubic"):
        read_volume(tmp_path / "flat.mrcs")
    with pytest.raises(ValueError, match=r"absent\.mrc"):
        read_volume(tmp_path / "absent.mrc")
    with pytest.raises(ValueError, match="3D"):
        write_volume(tmp_path / "x.mrc", np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="pixel_size_A"):
        write_volume(tmp_path / "x.mrc", np.zeros((4, 4, 4)), 0.0)


@needs_data
def test_shared_odd_map_reads():
    volume, pixel = read_volume(DATA / "maps" / "clean70SRibosome_vol_65p.mrc")
    assert volume.shape == (65, 65, 65) and pixel is None and np.isfinite(volume).all() and volume.std() > 0


def test_stack_reader_returns_requested_order(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 6, 6)).astype(np.float32)
    b = rng.normal(size=(3, 6, 6)).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", a, 1.2)
    write_stack(tmp_path / "b.mrcs", b, 1.2, dtype=np.float16)
    with mrcfile.open(tmp_path / "b.mrcs") as handle:
        assert handle.data.dtype == np.float16 and handle.is_image_stack()
        assert float(handle.voxel_size.x) == pytest.approx(1.2)
    single = rng.normal(size=(6, 6)).astype(np.float32)
    write_volume(tmp_path / "one.mrc", single[None], 1.2)        # a 2D single image (nz = 1)
    paths = np.array([str(tmp_path / n) for n in ["a.mrcs"] * 5 + ["b.mrcs"] * 3 + ["one.mrc"]], dtype=object)
    index = np.array([1, 2, 3, 4, 5, 1, 2, 3, 1])
    assert check_images(paths, index) == (6, 6)
    expected = np.concatenate([a, b.astype(np.float16).astype(np.float32), single[None]])
    with StackReader(paths, index) as reader:
        assert reader.image_shape() == (6, 6) and len(reader) == 9
        rows = np.array([8, 6, 0, 4, 5, 2, 7])
        images = reader.read(rows)
        assert images.dtype == np.float32 and images.shape == (7, 6, 6)
        assert np.array_equal(images, expected[rows])
        assert reader.read(np.array([], dtype=np.int64)).shape == (0, 6, 6)
        with pytest.raises(ValueError, match="rows"):
            reader.read(np.array([9]))


def test_open_stack_is_cached_until_closed(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.ones((4, 8, 8), np.float32), 1.0)
    first = open_stack(tmp_path / "s.mrcs")
    assert open_stack(str(tmp_path / "s.mrcs")) is first
    close_all()
    assert first.closed
    assert open_stack(tmp_path / "s.mrcs") is not first


def test_stack_reads_runs_and_gaps_without_mapping(tmp_path, monkeypatch):
    """Scattered, repeated and far-apart indices come back right whichever way the reads are
    split (small spans force several reads), and the stack is never memory-mapped, so that
    the pages read do not stay in the process's resident memory."""
    images = np.random.default_rng(3).normal(size=(40, 6, 8)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", images, 1.0)
    rows = np.array([39, 0, 1, 3, 3, 9, 20, 21, 38, 2])
    for span in (mrc._SPAN_BYTES, 2 * 6 * 8 * 4):
        monkeypatch.setattr(mrc, "_SPAN_BYTES", span)
        with StackReader(np.array([str(tmp_path / "s.mrcs")] * 40, dtype=object), np.arange(1, 41)) as reader:
            assert np.array_equal(reader.read(rows), images[rows])
            if os.path.exists("/proc/self/maps"):
                with open("/proc/self/maps") as maps:
                    assert str(tmp_path / "s.mrcs") not in maps.read()


def test_truncated_stack_fails_on_read(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((4, 4, 4), np.float32), 1.0)
    stack = open_stack(tmp_path / "s.mrcs")
    os.truncate(tmp_path / "s.mrcs", 1024 + 3 * 64)
    out = np.empty((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="ended while reading images 4..4"):
        stack.read(np.array([3]), out)
    close_all()


def test_stack_reader_out_of_range_index(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 4, 4), np.float32), 1.0)
    reader = StackReader(np.array([str(tmp_path / "s.mrcs")] * 2, dtype=object), np.array([1, 3]))
    with pytest.raises(ValueError, match=r"index 3 .*s\.mrcs"):
        reader.read(np.array([0, 1]))


@needs_data
def test_real_empiar_images():
    table = read_particles(DATA / "star-variants" / "empiar_10076_7.star")
    assert check_images(table.image_path, table.image_index) == (320, 320)
    header = read_header(table.image_path[0])
    assert (header.nx, header.ny, header.nz) == (320, 320, 7)
    reader = StackReader(table.image_path, table.image_index)
    images = reader.read(np.arange(7)[::-1])
    assert images.shape == (7, 320, 320) and images.dtype == np.float32
    assert np.isfinite(images).all()
    assert np.all(images.std(axis=(1, 2)) > 0)
    assert not np.array_equal(images[0], images[1])
    with mrcfile.open(table.image_path[0]) as handle:
        assert np.array_equal(images[0], handle.data[6].astype(np.float32))
    reader.close()


# --------------------------------------------------------------------------- check_images errors
def _stack(path: Path, n: int, ny: int, nx: int) -> str:
    write_stack(path, np.zeros((n, ny, nx), np.float32), 1.0)
    return str(path)


def test_missing_stack_named_with_count(tmp_path):
    star = tmp_path / "missing.star"
    star.write_text("data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@gone.mrcs 1.0\n2@gone.mrcs 1.0\n")
    table = read_particles(star)
    with pytest.raises(ValueError, match=r"gone\.mrcs \(2 particle\(s\)\).*--root"):
        check_images(table.image_path, table.image_index)


def test_index_out_of_range(tmp_path):
    path = _stack(tmp_path / "short.mrcs", 3, 8, 8)
    with pytest.raises(ValueError, match=r"index 4 .*short\.mrcs.* 3 image"):
        check_images([path] * 2, [1, 4])
    with pytest.raises(ValueError, match=r"index 0 .*short\.mrcs"):
        check_images([path], [0])


def test_non_mrc_file(tmp_path):
    tiff = tmp_path / "image.tif"
    tiff.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"image\.tif.*TIFF.*relion_image_handler"):
        check_images([str(tiff)], [1])
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"junk\.mrcs.*not an MRC"):
        check_images([str(junk)], [1])
    truncated = tmp_path / "cut.mrcs"
    truncated.write_bytes(Path(_stack(tmp_path / "full.mrcs", 4, 8, 8)).read_bytes()[:1500])
    with pytest.raises(ValueError, match=r"cut\.mrcs.*truncated"):
        check_images([str(truncated)], [1])


def test_box_checks(tmp_path):
    rect = _stack(tmp_path / "rect.mrcs", 2, 8, 10)
    with pytest.raises(ValueError, match=r"rect\.mrcs.*not square"):
        check_images([rect], [1])
    assert check_images([rect], [2], require_square_even=False) == (8, 10)
    odd = _stack(tmp_path / "odd.mrcs", 2, 9, 9)
    with pytest.raises(ValueError, match=r"odd\.mrcs.*odd box.*--new_box 10"):
        check_images([odd], [1])
    even = _stack(tmp_path / "even.mrcs", 2, 8, 8)
    with pytest.raises(ValueError, match=r"different boxes.*even\.mrcs.*odd\.mrcs"):
        check_images([even, odd], [1, 1])


def test_max_open_handles_is_bounded():
    assert 16 <= mrc._max_open_handles() <= 1024
