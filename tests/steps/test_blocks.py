"""The block kernels give the same bits whichever way their inputs reached the task."""

import numpy as np
import pytest

from coron_dask.steps import klip_blocks as blocks

NOISE = 1e-4  # nearly alike references: small modes, sensitive to rounding


def misaligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` one byte off its type's alignment: how distributed hands a task
    an array it received from another worker when the array's bytes follow others of odd
    length in the message."""
    raw = np.empty(array.nbytes + 1, dtype=np.uint8)[1:]
    copy = np.ndarray(array.shape, array.dtype, buffer=raw)
    copy[...] = array
    assert not copy.flags.aligned
    return copy


@pytest.fixture(scope="module")
def klip_inputs():
    """References aligned to two targets (2, p, y, x), their means, Gram matrices, KL
    weights and the targets' overlaps, as the pipeline's tasks hand them on."""
    rng = np.random.default_rng(11)
    ny = nx = 24
    y, x = np.indices((ny, nx)) - 11.5
    psf = np.exp(-(x**2 + y**2) / 18.0)
    refs = np.stack(
        [
            [psf * rng.uniform(0.8, 1.2) + NOISE * rng.normal(size=psf.shape) for _ in range(12)]
            for _ in range(2)
        ]
    ).astype(np.float32)
    targets = (psf * 1.05 + NOISE * rng.normal(size=(2, ny, nx))).astype(np.float32)
    means = blocks.means_block(refs)
    grams = blocks.gram_block([[refs]], [means], None, 10)
    weights = blocks.weights_block(grams, ny * nx, 8)
    overlaps = blocks.overlaps_block([[targets]], [[refs]], [means], 10)
    return refs, targets, means, grams, weights, overlaps


@pytest.mark.parametrize("rows", [24, 10, 1])
def test_gram_bordered_by_overlaps_is_the_two_passes_bit_for_bit(klip_inputs, rows):
    """With a basis per integration the Gram pass sums the science's overlaps too: the
    Gram matrix, the KL weights and the overlaps are those of the separate passes."""
    refs, targets, means, *_ = klip_inputs
    bordered = blocks.gram_block([[refs]], [means], [[targets]], rows)
    grams = blocks.gram_block([[refs]], [means], None, rows)
    overlaps = blocks.overlaps_block([[targets]], [[refs]], [means], rows)
    npsf = refs.shape[1]
    assert bordered.shape == (len(targets), 1, npsf, npsf + 1)
    np.testing.assert_array_equal(bordered[..., :npsf], grams)
    np.testing.assert_array_equal(bordered[..., npsf], overlaps)
    np.testing.assert_array_equal(
        blocks.weights_block(bordered, refs[0, 0].size, 8),
        blocks.weights_block(grams, refs[0, 0].size, 8),
    )


def test_klip_kernels_do_not_depend_on_input_alignment(klip_inputs):
    refs, targets, means, grams, weights, overlaps = klip_inputs
    cutoffs = (3, 8)

    def run(grams, weights, overlaps, means, targets):
        return (
            blocks.weights_block(grams, refs[0, 0].size, 8),
            blocks.overlaps_block([[targets]], [[refs]], [means], 10),
            blocks.project_block(
                targets, [[refs]], [means], [[[weights]]], [overlaps], 10, cutoffs
            ),
            blocks.errors_block([[refs]], [means], [[[weights]]], 10, cutoffs),
        )

    expected = run(grams, weights, overlaps, means, targets)
    received = run(*(misaligned(a) for a in (grams, weights, overlaps, means, targets)))
    for ours, theirs in zip(received, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_shared_basis_stays_a_view_when_misaligned(klip_inputs):
    """With one basis for every target (``align_to="first"``) the weights come broadcast
    (stride 0 along the targets); misaligned, they give the same bits, a target's matrices
    aligned at a time rather than the broadcast made whole."""
    refs, targets, means, _, weights, overlaps = klip_inputs
    shared = np.broadcast_to(weights[:1], weights.shape)
    received = np.broadcast_to(misaligned(weights[:1]), weights.shape)
    assert received.strides[0] == 0 and not received.flags.aligned
    args = (targets, [[refs]], [means])
    expected = blocks.project_block(*args, [[[shared]]], [overlaps], 10, (3, 8))
    ours = blocks.project_block(*args, [[[received]]], [overlaps], 10, (3, 8))
    np.testing.assert_array_equal(ours, expected)
