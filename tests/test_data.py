import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from resnetdist.data import augment as A
from resnetdist.data.cifar import (
    FOLDER, DataError, load_cifar10, read_batch_file, validation_indices, write_batch_file,
)
from resnetdist.data.resident import ResidentEvalLoader, ResidentTrainLoader
from resnetdist.data.order import eval_shard, rank_epoch_order

from .conftest import learnable_split, write_dataset


def test_binary_round_trip(tmp_path):
    split = learnable_split(37, seed=1)
    path = tmp_path / "data_batch_1.bin"
    write_batch_file(path, split)
    assert path.stat().st_size == 37 * 3073
    back = read_batch_file(path)
    assert np.array_equal(back.images, split.images) and np.array_equal(back.labels, split.labels)


def test_record_layout_is_label_then_rgb_planes(tmp_path):
    record = np.zeros(3073, dtype=np.uint8)
    record[0] = 7
    record[1 + 0 * 1024 + 5 * 32 + 9] = 11  # R plane, row 5, col 9
    record[1 + 2 * 1024 + 31 * 32 + 0] = 22  # B plane, row 31, col 0
    path = tmp_path / "test_batch.bin"
    record.tofile(path)
    split = read_batch_file(path)
    assert split.labels.tolist() == [7]
    assert split.images[0, 0, 5, 9] == 11 and split.images[0, 2, 31, 0] == 22
    assert split.images.sum() == 33


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "data_batch_3.bin"
    write_batch_file(path, learnable_split(4, seed=0))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="data_batch_3.bin.*truncated"):
        read_batch_file(path)


def test_bad_label_is_named(tmp_path):
    split = learnable_split(5, seed=0)
    split.labels[3] = 12
    path = tmp_path / "data_batch_2.bin"
    write_batch_file(path, split)
    with pytest.raises(DataError, match=r"data_batch_2.bin: record 3 has label 12"):
        read_batch_file(path)


def test_missing_file_and_folder(tmp_path):
    root = write_dataset(tmp_path / "d", 10, 10)
    (root / FOLDER / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match="data_batch_4.bin: missing"):
        load_cifar10(root)
    with pytest.raises(DataError, match="no such folder"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds neither"):
        load_cifar10(tmp_path)


def test_validation_split_is_fixed_and_disjoint(tmp_path):
    train_idx, val_idx = validation_indices(50_000)
    assert len(train_idx) == 45_000 and len(val_idx) == 5_000
    assert not set(train_idx) & set(val_idx)
    again = validation_indices(50_000)
    assert np.array_equal(again[1], val_idx)
    data = load_cifar10(write_dataset(tmp_path, 1200, 10), val_split=True)
    assert len(data.train) == 1000 and len(data.val) == 5000
    assert np.array_equal(data.train_indices, validation_indices(6000)[0])


def test_tarball_with_path_traversal_is_refused(tmp_path):
    import io
    import tarfile

    from resnetdist.data.cifar import extract

    bad = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="unsafe archive member"):
        extract(bad, out)
    assert not (tmp_path / "evil.txt").exists()


# ----- augmentation ---------------------------------------------------------------------------


def draw_params(seed: int, iteration: int, global_batch: int, rank: int, world_size: int) -> torch.Tensor:
    """One iteration's draws (3, b): the row the feed copies to the device for it."""
    return torch.from_numpy(A.draw_block(seed, iteration, 1, global_batch, rank, world_size)[0])


def test_every_crop_is_a_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mean = torch.rand(3, 32, 32)
    params = draw_params(seed=3, iteration=17, global_batch=64, rank=0, world_size=1)
    out = A.augment(x, mean, params)
    padded = torch.nn.functional.pad(A.normalize(x, mean), (4, 4, 4, 4))
    assert out.shape == (64, 3, 32, 32)
    for i in range(64):
        dy, dx, flip = params[:, i].tolist()
        assert 0 <= dy <= 8 and 0 <= dx <= 8
        window = padded[i, :, dy : dy + 32, dx : dx + 32]
        if flip:
            window = window.flip(-1)
        assert torch.equal(out[i], window)


def test_flip_is_an_exact_mirror_and_happens_about_half_the_time():
    x = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8)
    mean = torch.zeros(3, 32, 32)
    centre = torch.full((1000,), 4)
    flip = torch.arange(1000) % 2 == 0
    out = A.crop_flip(A.normalize(x, mean), centre, centre, flip)
    ref = A.normalize(x, mean)
    assert torch.equal(out[flip], ref[flip].flip(-1))
    assert torch.equal(out[~flip], ref[~flip])
    drawn = draw_params(0, 0, 1000, 0, 1)[2]
    assert 400 < int(drawn.sum()) < 600


def test_mean_is_removed():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(500, 3, 32, 32), dtype=np.uint8)
    mean = A.training_mean("pixel", [], images)
    normalized = A.normalize(torch.from_numpy(images), mean)
    assert normalized.mean(0).abs().max() < 1e-5  # per pixel, over the training set
    const = A.training_mean("channel", [125.0, 123.0, 114.0], None)
    assert torch.allclose(const[:, 0, 0] * 255, torch.tensor([125.0, 123.0, 114.0]))


def test_augmentation_params_do_not_depend_on_world_size():
    whole = draw_params(5, 99, 128, 0, 1)
    halves = torch.cat([draw_params(5, 99, 128, r, 2) for r in range(2)], dim=1)
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, draw_params(5, 100, 128, 0, 1))
    assert not torch.equal(whole, draw_params(6, 99, 128, 0, 1))


def test_an_epochs_draws_are_one_block_equal_to_each_iterations_own_and_fair():
    """draw_block (the epoch-ahead thread's few array operations) gives each iteration's
    draws exactly as a block of that iteration alone; crops are uniform over 0..8, flips a fair coin,
    and the rows independent of each other."""
    block = A.draw_block(7, 390, 390, 128, 1, 2)
    assert block.shape == (390, 3, 64) and block.dtype == np.int64
    assert all(torch.equal(torch.from_numpy(block[i]), draw_params(7, 390 + i, 128, 1, 2)) for i in (0, 1, 200, 389))
    many = A.draw_block(0, 0, 2000, 128, 0, 1)
    crops = np.bincount(many[:, :2].ravel(), minlength=9) / many[:, :2].size
    assert crops.shape == (9,) and np.abs(crops - 1 / 9).max() < 0.005
    assert abs(many[:, 2].mean() - 0.5) < 0.005
    assert abs(np.corrcoef(many[:, 0].ravel(), many[:, 1].ravel())[0, 1]) < 0.01


# ----- sample order and the resident loader ---------------------------------------------------


def test_rank_orders_partition_each_global_batch():
    n, batch = 1000, 64
    single = rank_epoch_order(n, batch, seed=1, epoch=2, rank=0, world_size=1).reshape(-1, batch)
    parts = [rank_epoch_order(n, batch, 1, 2, r, 4).reshape(-1, batch // 4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts, axis=1), single)
    assert len(set(single.ravel())) == (n // batch) * batch
    assert not np.array_equal(single, rank_epoch_order(n, batch, 1, 3, 0, 1).reshape(-1, batch))


def test_eval_shards_cover_once():
    shards = [eval_shard(1001, r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate(shards), np.arange(1001))


def test_resident_loader_resumes_mid_epoch_identically():
    split = learnable_split(300, seed=2)
    loader = ResidentTrainLoader(split, 32, seeds=[4], rank=0, world_size=1, device=torch.device("cpu"))
    assert loader.iters_per_epoch == 9
    out = torch.zeros(32, 3, 32, 32, dtype=torch.uint8), torch.zeros(32, dtype=torch.long)
    full = [lab.clone() for _, lab in _take(loader.batches(0, out), 20)]
    later = [lab.clone() for _, lab in _take(loader.batches(13, out), 7)]
    for a, b in zip(full[13:], later):
        assert torch.equal(a, b)


def test_resident_eval_loader_covers_shard():
    split = learnable_split(250, seed=3)
    seen = [lab for r in range(2) for _, lab in ResidentEvalLoader(split, 64, r, 2, torch.device("cpu"))]
    assert torch.equal(torch.cat(seen), torch.from_numpy(split.labels))


def _take(it, k):
    return [next(it) for _ in range(k)]


def _official_tarball(tmp_path):
    import tarfile

    src = write_dataset(tmp_path / "src", 8, 8)
    tar_path = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src / FOLDER, arcname=FOLDER)
    return tar_path


def test_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    from resnetdist.data import cifar
    from dataclasses import replace

    from resnetdist.data.cifar import download, extract, md5sum

    tar_path = _official_tarball(tmp_path)
    dest = tmp_path / "cache"
    # the module's source: the official URL and md5, here a local tarball's
    monkeypatch.setattr(cifar, "BINARY", replace(cifar.BINARY, url=tar_path.as_uri(), md5=md5sum(tar_path)))
    got = download(dest)
    assert got == dest / "cifar-10-binary.tar.gz" and md5sum(got) == md5sum(tar_path)
    folder = extract(got, dest)
    assert len(read_batch_file(folder / "data_batch_5.bin")) == 8

    other = tmp_path / "other"
    monkeypatch.setattr(cifar, "BINARY", replace(cifar.BINARY, md5="0123"))
    with pytest.raises(DataError, match="does not match the expected 0123"):
        download(other)
    assert list(other.iterdir()) == []  # no partial or unchecked file left behind
    monkeypatch.setattr(cifar, "BINARY", replace(cifar.BINARY, url=(tmp_path / "absent.tar.gz").as_uri()))
    with pytest.raises(DataError, match="could not download"):
        download(other)


def test_tarball_in_data_dir_must_be_the_official_one(tmp_path):
    tar_path = _official_tarball(tmp_path)
    # what to do is said: the download to repeat, and where
    with pytest.raises(DataError, match=f"^{tar_path}: md5 [0-9a-f]{{32}} is not the official c32a1d4ab5d03f1284b67883e8d87530 "
                                        rf"\(a cut or damaged download\?\): delete it and download "
                                        rf"https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz again into {tmp_path} "
                                        rf"\(or put the extracted cifar-10-batches-bin/ there\)$"):
        load_cifar10(tmp_path)
    python_tarball = tar_path.rename(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=f"^{python_tarball}: md5 .* is not the official c58f30108f718f92721af3b95e74349a "
                                        r".*download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz again"):
        load_cifar10(tmp_path)


def official(cifar, version_name: str, md5: str):
    """VERSIONS with that version's tarball md5 replaced (a small test archive stands in for the official one)."""
    from dataclasses import replace

    return tuple(replace(v, md5=md5) if v.name == version_name else v for v in cifar.VERSIONS)


def test_a_folder_extracted_from_the_verified_tarball_is_cifar10_until_a_file_changes(tmp_path, monkeypatch):
    """The manifest (each file's sha256, taken from the md5-verified archive) is written at
    extraction; a changed byte makes the folder 'modified'; a folder without one is 'unknown'.
    The archive here is a small one, so the expected md5 is its own."""
    import tarfile

    from resnetdist.data import cifar

    source = cifar.write_synthetic(tmp_path / "src", 20, 20) / cifar.FOLDER
    assert cifar.identity(source) == "unknown"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / cifar.TARBALL, "w:gz") as tar:
        tar.add(source, arcname=cifar.FOLDER)
    monkeypatch.setattr(cifar, "VERSIONS", official(cifar, "binary", cifar.md5sum(data_dir / cifar.TARBALL)))
    folder = cifar.locate(data_dir)
    assert (folder / cifar.MANIFEST).exists() and cifar.identity(folder) == "cifar10"
    assert cifar.load_cifar10(data_dir).describe().endswith("(verified CIFAR-10)")
    changed = bytearray((folder / "test_batch.bin").read_bytes())
    changed[1] ^= 1
    (folder / "test_batch.bin").write_bytes(bytes(changed))
    assert cifar.identity(folder) == "modified"
    (folder / cifar.MANIFEST).unlink()  # an older extraction: the verified tarball beside it restores the manifest,
    cifar.locate(data_dir)  # from the archive, not from the changed folder
    assert cifar.identity(folder) == "modified"


# ----- the Python version (cifar-10-batches-py/, what torchvision downloads) ----------------------


def write_python_version(binary_root: Path, dest: Path) -> Path:
    """The binary stand-in under binary_root rewritten in the Python version's layout under
    dest/cifar-10-batches-py: a pickled dict per batch, as the official files hold them."""
    import pickle

    from resnetdist.data import cifar

    folder = dest / cifar.PYTHON.folder
    folder.mkdir(parents=True)
    for bin_name, py_name in zip(cifar.BINARY.files, cifar.PYTHON.files):
        split = read_batch_file(binary_root / cifar.FOLDER / bin_name)
        batch = {"batch_label": py_name, "labels": split.labels.tolist(), "data": split.images.reshape(len(split), -1),
                 "filenames": [f"img_{i}.png" for i in range(len(split))]}
        (folder / py_name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_the_python_version_reads_as_the_same_images_and_labels(tmp_path):
    from resnetdist.data import cifar

    binary = write_dataset(tmp_path / "bin", 12, 10)
    folder = write_python_version(binary, tmp_path / "py")
    for data_dir in (tmp_path / "py", folder):  # the folder holding it, or the folder itself
        got, want = load_cifar10(data_dir, val_split=False), load_cifar10(binary)
        assert got.folder == folder and cifar.version_of(folder).name == "python"
        for a, b in ((got.train, want.train), (got.test, want.test)):
            assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
        assert got.file_records == {n: 12 for n in cifar.PYTHON.train_files} | {"test_batch": 10}
    assert got.identity == "unknown"  # a stand-in: its files are not the official ones
    assert len(cifar.load_test_only(tmp_path / "py").test) == 10


def flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_the_python_version_is_cifar10_only_when_its_files_are_the_official_ones(tmp_path, monkeypatch):
    """Two ways, as for the binary version: extracted from the md5-verified cifar-10-python.tar.gz
    (a manifest of the archive's files), or, as torchvision leaves it without a manifest, each
    file matching the official md5 torchvision checks. Small files stand in for the official ones
    here, so the expected digests are their own."""
    import tarfile
    from dataclasses import replace

    from resnetdist.data import cifar

    source = write_python_version(write_dataset(tmp_path / "bin", 12, 10), tmp_path / "src")
    own_md5 = {name: cifar.md5sum(source / name) for name in cifar.PYTHON.file_md5}
    assert cifar.identity(source) == "unknown"  # the real digests: these are not CIFAR-10's files
    with_md5 = tuple(replace(v, file_md5=own_md5) if v.name == "python" else v for v in cifar.VERSIONS)
    monkeypatch.setattr(cifar, "VERSIONS", with_md5)
    assert cifar.identity(source) == "cifar10"
    flip_a_byte(source / "test_batch")
    assert cifar.identity(source) == "unknown"  # not claimed: neither official nor described by a manifest
    monkeypatch.undo()

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    source = write_python_version(write_dataset(tmp_path / "bin2", 12, 10), tmp_path / "src2")
    with tarfile.open(data_dir / cifar.PYTHON.tarball, "w:gz") as tar:
        tar.add(source, arcname=cifar.PYTHON.folder)
    with pytest.raises(DataError, match="is not the official c58f30108f718f92721af3b95e74349a"):
        cifar.locate(data_dir)  # the real md5: this small archive is not it
    monkeypatch.setattr(cifar, "VERSIONS", official(cifar, "python", cifar.md5sum(data_dir / cifar.PYTHON.tarball)))
    folder = cifar.locate(data_dir)
    assert folder == data_dir / cifar.PYTHON.folder and cifar.identity(folder) == "cifar10"
    assert set(json.loads((folder / cifar.MANIFEST).read_text())["files"]) == set(cifar.PYTHON.file_md5)
    assert load_cifar10(data_dir).describe().endswith("(verified CIFAR-10)")
    flip_a_byte(folder / "data_batch_3")
    assert cifar.identity(folder) == "modified"


def test_a_python_batch_that_is_not_one_is_named_and_never_run(tmp_path):
    import pickle

    from resnetdist.data import cifar

    folder = write_python_version(write_dataset(tmp_path / "bin", 12, 10), tmp_path / "py")
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {"hostile": (pickle.dumps({"data": Hostile()}), "refusing to build posix.system"),
             "cut": ((folder / "test_batch").read_bytes()[:300], "unpickling failed"),
             "other": (pickle.dumps({"data": [1, 2], "labels": [0, 1]}), "want 'data': uint8 (N, 3072)"),
             "label": (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 10]}), "record 1 has label 10")}
    for what, (content, words) in cases.items():
        (folder / "test_batch").write_bytes(content)
        with pytest.raises(DataError, match=re.escape(f"{folder / 'test_batch'}: ") + ".*" + re.escape(words)):
            cifar.load_cifar10(folder)
    assert not marker.exists()
