"""Tests for granet.data: splits, determinism, shapes, CIFAR errors, batching, augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from granet.data import (
    Split,
    StreamedSplit,
    augment_cifar,
    available_datasets,
    builtin_info,
    iterate_batches,
    load_dataset,
    validate_data_name,
)


def test_available() -> None:
    assert available_datasets() == ["mnist1d", "digits", "cifar10", "cifar100", "fake"]


def test_mnist1d_splits_and_determinism() -> None:
    a = load_dataset("mnist1d", seed=0)
    b = load_dataset("mnist1d", seed=0)
    c = load_dataset("mnist1d", seed=1)
    assert a.input_shape == (1, 40) and a.num_classes == 10 and a.augment is None
    assert (len(a.train), len(a.val), len(a.test)) == (3600, 400, 1000)
    assert a.train.x.shape == (3600, 1, 40) and a.train.x.dtype == torch.float32
    assert a.train.y.dtype == torch.int64 and set(a.train.y.tolist()) == set(range(10))
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).x, getattr(b, s).x)
        assert torch.equal(getattr(a, s).y, getattr(b, s).y)
    assert torch.equal(a.test.x, c.test.x) and torch.equal(a.test.y, c.test.y)
    assert not torch.equal(a.val.x, c.val.x)
    # val is carved from train: train+val is the same multiset of rows for both seeds
    sums_a = torch.cat([a.train.x, a.val.x]).flatten(1).sum(1).sort().values
    sums_c = torch.cat([c.train.x, c.val.x]).flatten(1).sum(1).sort().values
    assert torch.equal(sums_a, sums_c)


def test_mnist1d_does_not_touch_global_rng_and_num_samples() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = load_dataset("mnist1d", num_samples=500, val_fraction=0.0)
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    assert (len(d.train), len(d.val), len(d.test)) == (400, 0, 100)
    assert d.val.x.shape == (0, 1, 40) and d.val.y.dtype == torch.int64


def test_digits() -> None:
    d = load_dataset("digits", val_fraction=0.2, seed=3)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert len(d.test) == 359 and len(d.val) == round(0.2 * (1797 - 359))
    assert d.train.x.min().item() == 0.0 and d.train.x.max().item() == 1.0
    other = load_dataset("digits", val_fraction=0.2, seed=4)
    assert torch.equal(d.test.x, other.test.x)


def test_cifar_absent_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.download") as info:
        load_dataset("cifar10", data_dir=str(tmp_path / "nothing"), download=False)
    assert "data.data_dir=" in str(info.value)


def test_fake() -> None:
    d = load_dataset("fake", val_fraction=0.25)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert (len(d.train), len(d.val), len(d.test)) == (192, 64, 64)
    e = load_dataset("fake", val_fraction=0.25)
    assert torch.equal(d.train.x, e.train.x)
    assert len(load_dataset("fake", num_samples=40, val_fraction=0.0).test) == 10


def test_unknown_dataset_and_bad_fraction() -> None:
    with pytest.raises(ValueError, match=r"data.name='imagenet'.*allowed: mnist1d, digits"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        load_dataset("fake", val_fraction=1.0)


def test_dataset_to_returns_new() -> None:
    d = load_dataset("fake", num_samples=8, val_fraction=0.0)
    e = d.to("cpu")
    assert e is not d and e.input_shape == d.input_shape and torch.equal(e.train.x, d.train.x)


def _split(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.float32).view(n, 1), torch.arange(n))


def test_iterate_batches_covers_once_and_is_seeded() -> None:
    s = _split(103)

    def order(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        batches = list(iterate_batches(s, 10, shuffle=True, generator=g))
        assert [len(y) for _, y in batches] == [10] * 10 + [3]
        for x, y in batches:
            assert torch.equal(x[:, 0].long(), y)
        return torch.cat([y for _, y in batches]).tolist()

    o1, o2, o3 = order(0), order(0), order(1)
    assert sorted(o1) == list(range(103))
    assert o1 == o2 and o1 != o3 and o1 != list(range(103))
    plain = torch.cat([y for _, y in iterate_batches(s, 10, shuffle=False)]).tolist()
    assert plain == list(range(103))
    dropped = list(
        iterate_batches(
            s, 10, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
        )
    )
    assert len(dropped) == 10
    assert list(iterate_batches(_split(0), 4, shuffle=True)) == []


def test_cifar_augmentation_shape_and_determinism() -> None:
    x = torch.randn(16, 3, 32, 32)
    s = Split(x, torch.zeros(16, dtype=torch.int64))

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat(
            [b for b, _ in iterate_batches(s, 8, shuffle=False, generator=g, augment="cifar")]
        )

    a, b, c = run(0), run(0), run(1)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def _expected(img: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """Hand-written crop of the 4-padded image at offset (dy, dx), then optional flip."""
    _, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i + dy - 4, j + dx - 4
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out.flip(-1) if flip else out


def test_cifar_augmentation_matches_hand_computed() -> None:
    torch.manual_seed(0)
    x = torch.rand(32, 2, 6, 5) + 1.0  # strictly positive, so zero padding is recognizable
    out = augment_cifar(x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape
    seen_flip = seen_plain = seen_shift = False
    for k in range(len(x)):
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(out[k], _expected(x[k], dy, dx, f))
        ]
        assert len(matches) == 1, f"sample {k}: {len(matches)} candidate transforms"
        dy, dx, f = matches[0]
        seen_flip |= f
        seen_plain |= not f
        seen_shift |= (dy, dx) != (4, 4)
    assert seen_flip and seen_plain and seen_shift
    # the draws are exactly: offsets dy, dx in [0, 8], then flip mask, from the generator
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 9, (32,), generator=g)
    dx = torch.randint(0, 9, (32,), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    assert torch.equal(out[0], _expected(x[0], int(dy[0]), int(dx[0]), bool(flip[0])))


def test_iterate_batches_rejects_unknown_augment() -> None:
    with pytest.raises(ValueError, match="augment"):
        next(iterate_batches(_split(4), 2, shuffle=False, augment="mixup"))


def test_download_offline_is_named_and_bounded(tmp_path, monkeypatch) -> None:
    """data.download=true without a network: a FileNotFoundError naming data.data_dir and the
    fix, within the probe's timeout even when connecting hangs; the directory is not created."""
    import socket
    import time

    import granet.data.builtin as gdata  # where the timeout is read

    def hang(*args, **kwargs):  # a connection attempt that answers far too late
        time.sleep(5)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(gdata, "DOWNLOAD_PROBE_TIMEOUT_S", 0.5)
    data = tmp_path / "cifar"
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar100", data_dir=str(data), download=True)
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert msg.startswith(f"cifar100 not found under data.data_dir='{data}', and "
                          "data.download=true cannot reach https://www.cs.toronto.edu/")
    assert "(no answer within 0.5 s)" in msg
    assert "place the extracted torchvision files ('cifar-100-python/') under data.data_dir" in msg
    assert not data.exists()


def test_download_into_a_data_dir_under_a_file(tmp_path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=str(tmp_path / "f" / "d"), download=True)
    assert str(info.value) == (
        f"data.data_dir='{tmp_path / 'f' / 'd'}': '{tmp_path / 'f'}' is a file, not a "
        f"directory; point data.data_dir at a directory"
    )


# ------------------------------------------------------------------------- user data sets

USER = "tests.fixtures.user_data"


def test_builtin_info_matches_loading() -> None:
    for name, kw in [("mnist1d", {}), ("mnist1d", {"num_samples": 1000}), ("digits", {}),
                     ("digits", {"num_samples": 500}), ("fake", {"num_samples": 40})]:
        d = load_dataset(name, val_fraction=0.2, **kw)
        info = builtin_info(name, val_fraction=0.2, **kw)
        assert (info.input_shape, info.num_classes, info.n_train) == (
            d.input_shape, d.num_classes, len(d.train)
        ), (name, kw)


def test_user_tensors_numpy_and_carved_val() -> None:
    d = load_dataset(f"{USER}:signals", val_fraction=0.25, seed=3)
    assert d.name == f"{USER}:signals" and d.input_shape == (1, 16) and d.num_classes == 3
    assert (len(d.train), len(d.val), len(d.test)) == (300, 100, 100)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    from tests.fixtures.user_data import _signals

    x, y = _signals(400, 0)  # the val rows are the seeded permutation's first 100, sorted
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(3))
    val_idx = perm[:100].sort().values
    assert torch.equal(d.val.x, torch.as_tensor(x, dtype=torch.float32)[val_idx])
    assert torch.equal(d.val.y, torch.as_tensor(y)[val_idx])
    # num_samples: a seeded subset when the function does not take it, passed when it does.
    assert len(load_dataset(f"{USER}:signals", val_fraction=0.0, num_samples=50).train) == 50
    tok = load_dataset(f"{USER}:tokens", num_samples=120)
    assert (len(tok.train), len(tok.val)) == (120, 100)  # a given val split is kept as is
    assert tok.train.x.dtype == torch.int64 and tok.input_shape == (8,)


def test_user_dataset_in_memory_equals_tensors_and_streamed_order_is_identical() -> None:
    tensors = load_dataset(f"{USER}:signals", val_fraction=0.1)
    memory = load_dataset(f"{USER}:signals_dataset", val_fraction=0.1)
    streamed = load_dataset(f"{USER}:signals_streamed", val_fraction=0.1)
    assert isinstance(memory.train, Split) and isinstance(streamed.train, StreamedSplit)
    assert torch.equal(memory.train.x, tensors.train.x) and torch.equal(memory.val.y,
                                                                         tensors.val.y)
    assert len(streamed.train.y) == len(tensors.train) == 360
    assert streamed.train.x.shape == (360, 1, 16)
    assert torch.equal(streamed.train.x[:5], tensors.train.x[:5])
    s = streamed.to("cpu")
    for shuffle in (True, False):
        a = list(iterate_batches(tensors.train, 64, shuffle=shuffle, drop_last=True,
                                 generator=torch.Generator().manual_seed(7)))
        b = list(iterate_batches(s.train, 64, shuffle=shuffle, drop_last=True,
                                 generator=torch.Generator().manual_seed(7)))
        assert len(a) == len(b) == 5
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streamed_and_in_memory_runs_train_identically() -> None:
    from granet.config import load_config
    from granet.trainer import Trainer

    def run(name: str) -> list[float]:
        cfg = load_config(None, [
            f"data.name={USER}:{name}", "data.batch_size=60", "model.name=mlp",
            "model.kwargs={hidden: [16]}", "sparsity.method=rigl", "sparsity.update_interval=3",
            "run.epochs=2", "optim.milestones=[1]", "run.device=cpu",
        ])
        tr = Trainer(cfg, write=False)
        tr.fit(resume=False)
        return [h[k] for h in tr.history for k in ("train_loss", "val_acc", "test_acc")]

    assert run("signals_streamed") == run("signals")


@pytest.mark.parametrize(
    ("fn", "needle"),
    [
        ("raises", "the data function raised RuntimeError: cannot reach the data server"),
        ("not_a_dict", "returned list; must return a dict with 'train' and 'test'"),
        ("missing_test", "missing ['test']"),
        ("wrong_lengths", "split 'train': x has 10 samples but y has 9"),
        ("float_labels", "split 'train': y has dtype torch.float32; must be integer labels"),
        ("labels_out_of_range", "split 'test' has labels in [5, 7]; must lie in [0, "
                                "num_classes=3)"),
        ("shape_mismatch", "splits differ in sample shape or dtype (train: (1, 16)"),
        ("bad_items", "split 'train': item 0 is Tensor; must be an (x, y) pair"),
        ("streamed_without_classes", "the returned dict must give 'num_classes'"),
        ("NOPE", "has no attribute 'NOPE'"),
    ],
)
def test_user_data_validation_names_data_name(fn, needle) -> None:
    from granet.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_dataset(f"{USER}:{fn}")
    assert str(info.value).startswith(f"data.name='{USER}:{fn}': ") and needle in str(info.value)


def test_data_name_validated_in_config() -> None:
    from granet.config import ConfigError, load_config

    assert load_config(None, [f"data.name={USER}:signals"]).data.name == f"{USER}:signals"
    validate_data_name("mnist1d")
    for bad, needle in [("imagenet", "must be one of mnist1d, digits, cifar10, cifar100, fake, "
                                     "or a user data function 'package.module:function'"),
                        ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
                        ("bad path:fn", "malformed import path")]:
        with pytest.raises(ConfigError, match="data.name=") as info:
            load_config(None, [f"data.name={bad}"])
        assert needle in str(info.value)
