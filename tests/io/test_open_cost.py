"""What opening a product costs, measured in a process of its own (``benchmarks.open_product``):
opening reads the headers and adds next to nothing to the resident memory; selecting one
frame and computing it reads that frame (FITS) or the one stored chunk that holds it (Zarr).

Memory: the peak resident memory (VmHWM, reset just before the open) over the resident
memory before it, so that data read and let go within the open still count (astropy, asked
whether an image had data, read it whole and dropped it: the peak, not what stays, showed
that). Bytes read: ``rchar`` of /proc/self/io, every byte read() handed the process, from the
disk or the page cache alike (``read_bytes`` counts only the disk, and a file just written
sits in the page cache); a memory map's pages would escape ``rchar`` and show in the
resident memory, measured too."""

import pytest
import zarr

from benchmarks.open_product import FRAME, measure, write_psfalign

MB = 1e6


@pytest.fixture
def products(tmp_path, request):
    """A psfalign of the requested (integrations, psfs, size) as FITS and as a Zarr store
    (or FITS alone), each with a small twin the probe opens first."""
    frames, formats = request.param
    pairs = []
    for fmt in formats:
        (tmp_path / fmt / "twin").mkdir(parents=True)
        twin = write_psfalign(tmp_path / fmt / "twin", 2, frames[1], 16, fmt)
        pairs.append((write_psfalign(tmp_path / fmt, *frames, fmt), twin))
    return pairs


def check_open_and_frame(rows: list[dict], pairs: list) -> None:
    for row, (path, _) in zip(rows, pairs, strict=True):
        # opening: its headers (a few kB), the ALIGN table, the Dataset's own objects
        assert row["open_rss"] < min(50 * MB, 0.05 * row["file_bytes"]), (path.name, row)
        frame = row["frame_bytes"]
        if path.suffix == ".fits":
            # the frame's bytes, and the few of reading /proc/self/io itself
            assert frame <= row["frame_read"] <= frame + 1024, row
        else:  # the stored chunk that holds the frame, and the array's metadata
            chunks = zarr.open_array(str(path), path="SCI", mode="r").chunks
            index = [i // n for i, n in zip((*FRAME, 0, 0), chunks, strict=True)]
            held = (path / "SCI" / "c").joinpath(*map(str, index)).stat().st_size
            metadata = (path / "SCI" / "zarr.json").stat().st_size
            assert held <= row["frame_read"] <= held + metadata + 1024, row
        # chunks of whole frames, as many as dask's array.chunk-size holds (here: all)
        assert row["chunk"][-2:] == [320, 320] and row["chunk"][0] > 1, row


@pytest.mark.parametrize("products", [((4, 5, 320), ("fits", "zarr"))], indirect=True)
def test_opening_reads_headers_and_a_frame_reads_that_frame(products):
    """16 MB a product: astropy's read made the open peak at the file's size."""
    check_open_and_frame(measure(*products), products)


@pytest.mark.parametrize("products", [((90, 5, 320), ("fits",))], indirect=True)
def test_a_368_mb_psfalign_opens_in_under_50_mb(products):
    rows = measure(*products)
    assert rows[0]["file_bytes"] > 368 * MB
    check_open_and_frame(rows, products)
