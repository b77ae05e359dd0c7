"""Tests for the reservoir-sampling ReplayBuffer in dlcft_jax.data."""

import numpy as np
import pytest

from dlcft_jax.data import ReplayBuffer


def _examples(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiny images whose pixels and labels encode the example id."""
    ids = np.arange(start, start + n)
    images = np.broadcast_to(
        (ids % 256).astype(np.uint8)[:, None, None, None], (n, 2, 2, 3)
    ).copy()
    return images, ids.astype(np.int32)


def _offer(
    buf: ReplayBuffer, total: int, batch: int, rng: np.random.Generator
) -> None:
    """Offers examples 0..total-1 in chunks of `batch` (last may be short)."""
    for start in range(0, total, batch):
        n = min(batch, total - start)
        images, labels = _examples(start, n)
        buf.add(images, labels, task_ids=start // 10, rng=rng)


@pytest.mark.parametrize(
    'capacity,total,batch',
    [(5, 3, 2), (5, 5, 5), (5, 23, 4), (8, 100, 32), (3, 50, 1)],
)
def test_size_is_min_of_capacity_and_seen(capacity, total, batch):
    buf = ReplayBuffer(capacity)
    assert buf.is_empty() and len(buf) == 0
    _offer(buf, total, batch, np.random.default_rng(0))
    assert buf.num_seen == total
    assert len(buf) == min(capacity, total)
    stored = buf.contents()['label']
    # No example is stored twice, and each stored one was actually offered.
    assert len(np.unique(stored)) == len(stored)
    assert stored.min() >= 0 and stored.max() < total


def test_fills_in_order_before_capacity():
    buf = ReplayBuffer(10)
    _offer(buf, 7, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(buf.contents()['label'], np.arange(7))


def test_each_example_kept_with_probability_capacity_over_seen():
    # Algorithm R keeps each of N offered examples with probability
    # capacity / N, whatever its position in the stream and however the
    # stream is chunked into batches.
    capacity, total, trials = 10, 50, 2000
    counts = np.zeros(total)
    for seed in range(trials):
        buf = ReplayBuffer(capacity)
        _offer(buf, total, 7, np.random.default_rng(seed))
        counts[buf.contents()['label']] += 1
    freq = counts / trials
    expected = capacity / total
    # Binomial std is sqrt(0.2 * 0.8 / 2000) ~ 0.009; 0.045 is ~5 sigma.
    assert np.abs(freq - expected).max() < 0.045, freq
    # Early, middle and late examples are treated alike on average.
    for part in np.split(freq, 5):
        assert abs(part.mean() - expected) < 0.015


class _FixedDraws:
    """A stand-in Generator whose reservoir draws the test chooses."""

    def __init__(self, draws):
        self._draws = np.asarray(draws)

    def integers(self, low, high):
        assert np.all(self._draws < np.asarray(high))
        return self._draws


def test_later_offer_in_same_batch_wins_a_slot():
    buf = ReplayBuffer(2)
    images, labels = _examples(0, 2)
    buf.add(images, labels, 0, rng=np.random.default_rng(0))
    # Offers 2, 3, 4 draw j = 0, 3, 0: offer 2 takes slot 0, offer 3 is
    # discarded (3 >= capacity), offer 4 then overwrites slot 0.
    images, labels = _examples(2, 3)
    buf.add(images, labels, 1, rng=_FixedDraws([0, 3, 0]))
    np.testing.assert_array_equal(buf.contents()['label'], [4, 1])
    np.testing.assert_array_equal(buf.contents()['task_id'], [1, 0])
    assert buf.contents()['image'][0, 0, 0, 0] == 4
    assert buf.num_seen == 5


def test_deterministic_given_seed():
    results = []
    for _ in range(2):
        buf = ReplayBuffer(16)
        _offer(buf, 200, 13, np.random.default_rng(7))
        sample = buf.sample(8, np.random.default_rng(3))
        results.append((buf.contents()['label'], sample['label']))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_sample_has_static_size_without_replacement_when_possible():
    buf = ReplayBuffer(20)
    _offer(buf, 100, 10, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = buf.sample(20, rng)
        assert s['image'].shape == (20, 2, 2, 3)
        assert s['image'].dtype == np.uint8
        assert s['label'].shape == (20,) and s['task_id'].shape == (20,)
        # Without replacement: a batch of the full size is a permutation.
        assert len(np.unique(s['index'])) == 20
        # Rows stay aligned: the pixel value encodes the label.
        np.testing.assert_array_equal(s['image'][:, 0, 0, 0], s['label'] % 256)


def test_sample_uses_replacement_when_buffer_is_small():
    buf = ReplayBuffer(50)
    _offer(buf, 3, 3, np.random.default_rng(0))
    s = buf.sample(16, np.random.default_rng(0))
    assert s['label'].shape == (16,)
    assert set(s['label'].tolist()) <= {0, 1, 2}


def test_sample_from_empty_buffer_fails_clearly():
    with pytest.raises(ValueError, match='empty'):
        ReplayBuffer(4).sample(2, np.random.default_rng(0))


def test_state_dict_round_trip_and_continuation():
    buf = ReplayBuffer(12)
    rng = np.random.default_rng(0)
    for start in range(0, 60, 6):
        images, labels = _examples(start, 6)
        logits = np.tile(labels[:, None].astype(np.float32), (1, 4))
        buf.add(images, labels, start // 20, logits=logits, rng=rng)
    state = buf.state_dict()
    assert set(state) == {
        'capacity',
        'num_seen',
        'images',
        'labels',
        'task_ids',
        'logits',
    }
    assert all(isinstance(v, (int, np.ndarray)) for v in state.values())
    restored = ReplayBuffer.from_state_dict(state)
    assert restored.capacity == 12 and restored.num_seen == 60
    for key, value in buf.contents().items():
        np.testing.assert_array_equal(restored.contents()[key], value)

    # Both copies evolve identically under the same random stream.
    images, labels = _examples(60, 30)
    logits = np.zeros((30, 4), np.float32)
    for b in (buf, restored):
        b.add(images, labels, 3, logits=logits, rng=np.random.default_rng(5))
    for key, value in buf.contents().items():
        np.testing.assert_array_equal(restored.contents()[key], value)


def test_state_dict_of_empty_buffer():
    restored = ReplayBuffer.from_state_dict(ReplayBuffer(3).state_dict())
    assert restored.is_empty() and restored.capacity == 3


def test_logits_must_be_used_consistently():
    buf = ReplayBuffer(4)
    images, labels = _examples(0, 2)
    buf.add(images, labels, 0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match='logits'):
        buf.add(
            images,
            labels,
            0,
            logits=np.zeros((2, 3)),
            rng=np.random.default_rng(0),
        )


def test_rejects_non_uint8_images_and_bad_capacity():
    buf = ReplayBuffer(4)
    with pytest.raises(ValueError, match='uint8'):
        buf.add(
            np.zeros((2, 2, 2, 3), np.float32),
            np.zeros(2, np.int32),
            0,
            rng=np.random.default_rng(0),
        )
    with pytest.raises(ValueError, match='capacity'):
        ReplayBuffer(0)
