"""Standard datasets: checked downloads, real-format loaders, the feature cache,
the data CLI and the image backbones.

Every fixture file is written here in its dataset's real on-disk format
(gzip IDX, bz2 LIBSVM, MATLAB .mat, torch-saved tensors in a tar.gz, JPEG
class folders in a tar.gz or zip, VisDA image lists, processed_acl review
files), served from a loopback HTTP server started by the test, and fetched
through the real download code (``DABENCH_MIRROR`` points it at the server).
Nothing here reaches the internet.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import io
import struct
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, write
from dabench.data import download as dl
from dabench.data.core import DataError, Protocol, make_split

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------
# the loopback mirror
# --------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1 (random port), set as DABENCH_MIRROR."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DABENCH_MIRROR", f"http://127.0.0.1:{srv.server_port}")
    # a plain-http mirror: files without a published hash need the explicit opt-in
    # (test_http_mirror_is_refused_for_unhashed_files checks the refusal)
    monkeypatch.setenv("DABENCH_ALLOW_HTTP", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("DABENCH_DATA", raising=False)
    yield folder
    srv.shutdown()
    srv.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(mirror: Path, monkeypatch, dataset: str, files: dict[str, bytes], pin: bool = True,
            algo: str = "sha256") -> None:
    """Put ``files`` on the mirror under ``dataset/``.  With ``pin``, the
    registry's upstream hashes are replaced by the fixtures' sha256 (the real
    ones describe the real, multi-MB files); without, the dataset keeps its
    "no upstream hash" entries (trust on first use)."""
    (mirror / dataset).mkdir(exist_ok=True)
    for name, data in files.items():
        (mirror / dataset / name).write_bytes(data)
    ds = dl.DATASETS[dataset]
    assert {f.name for f in ds.files} == set(files), "a fixture must provide every file of the dataset"
    if pin:
        digest = {"sha256": _sha, "md5": lambda b: hashlib.md5(b).hexdigest()}[algo]
        new = tuple(dataclasses.replace(f, **{"sha256": None, "md5": None, algo: digest(files[f.name])},
                                        size=None, hash_source="test fixture") for f in ds.files)
        monkeypatch.setitem(dl.DATASETS, dataset, dataclasses.replace(ds, files=new))


# --------------------------------------------------------------------------
# fixture files in the real formats
# --------------------------------------------------------------------------


def idx_gz(arr: np.ndarray) -> bytes:
    header = b"\0\0\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def digit_images(n: int, size: int, channels: int = 0) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % 10
    shape = (n, size, size) + ((channels,) if channels else ())
    return RNG.integers(0, 256, size=shape, dtype=np.uint8), y.astype(np.uint8)


def mnist_files(n_train=200, n_test=60):
    xtr, ytr = digit_images(n_train, 28)
    xte, yte = digit_images(n_test, 28)
    files = {"train-images-idx3-ubyte.gz": idx_gz(xtr), "train-labels-idx1-ubyte.gz": idx_gz(ytr),
             "t10k-images-idx3-ubyte.gz": idx_gz(xte), "t10k-labels-idx1-ubyte.gz": idx_gz(yte)}
    return files, np.concatenate([xtr, xte]), np.concatenate([ytr, yte])


def libsvm_bz2(x: np.ndarray, y: np.ndarray) -> bytes:
    lines = []
    for row, label in zip(x, y):
        vals = row.reshape(-1) / 127.5 - 1.0  # [-1, 1] like the LIBSVM copy
        lines.append(f"{int(label) + 1} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(vals)))
    return bz2.compress(("\n".join(lines) + "\n").encode("ascii"))


def usps_files(n_train=150, n_test=50):
    xtr, ytr = digit_images(n_train, 16)
    xte, yte = digit_images(n_test, 16)
    return ({"usps.bz2": libsvm_bz2(xtr, ytr), "usps.t.bz2": libsvm_bz2(xte, yte)},
            np.concatenate([xtr, xte]), np.concatenate([ytr, yte]))


def mat_bytes(**arrays) -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, arrays)
    return buf.getvalue()


def svhn_files(n_train=100, n_test=40):
    out, xs, ys = {}, [], []
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x, y = digit_images(n, 32, channels=3)
        y_mat = np.where(y == 0, 10, y).astype(np.uint8)[:, None]  # SVHN stores digit 0 as 10
        out[name] = mat_bytes(X=x.transpose(1, 2, 3, 0), y=y_mat)
        xs.append(x)
        ys.append(y)
    return out, np.concatenate(xs), np.concatenate(ys)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def mnistm_files(n_train=100, n_test=40):
    import torch

    out, xs, ys = {}, [], []
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = digit_images(n, 28, channels=3)
        buf = io.BytesIO()
        torch.save((torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))), buf)
        out[f"mnist_m_{split}.pt.tar.gz"] = tar_gz({f"mnist_m_{split}.pt": buf.getvalue()})
        xs.append(x)
        ys.append(y)
    return out, np.concatenate(xs), np.concatenate(ys)


def jpeg(colour: tuple[int, int, int], size=(12, 9)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def class_colour(label: int) -> tuple[int, int, int]:
    return (label * 8 % 256, 255 - label * 8 % 256, 128)


def office31_files(per_class=2, top=""):
    from dabench.data.standard import OFFICE31_CLASSES

    members = {}
    for dom in ("amazon", "dslr", "webcam"):
        for label, c in enumerate(OFFICE31_CLASSES):
            for i in range(per_class):
                members[f"{top}{dom}/images/{c}/frame_{i:04d}.jpg"] = jpeg(class_colour(label))
    return {"domain_adaptation_images.tar.gz": tar_gz(members)}


# --------------------------------------------------------------------------
# the bar: missing data
# --------------------------------------------------------------------------


def test_verify_missing_data_names_file_place_and_command(tmp_path):
    empty = tmp_path / "EMPTY"
    empty.mkdir()
    r = run_cli("data", "verify", "mnist", "--data-root", str(empty), env={"DABENCH_MIRROR": ""})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "train-images-idx3-ubyte.gz" in r.stderr
    assert str(empty / "mnist") in r.stderr
    assert f"dabench data download mnist --data-root {empty}" in r.stderr


def test_missing_manual_dataset_gives_the_manual_steps_and_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("DABENCH_MIRROR", raising=False)
    from dabench.data.standard import IMAGE_DOMAINS

    with pytest.raises(DataError) as e:
        IMAGE_DOMAINS["office31-amazon"].items(tmp_path)
    msg = str(e.value)
    assert "domain_adaptation_images.tar.gz" in msg and str(tmp_path / "office31") in msg
    assert "manual steps" in msg and "images/<class>/*.jpg" in msg


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DABENCH_DATA", str(tmp_path / "env"))
    assert dl.resolve_data_root(None).path == (tmp_path / "env").resolve()
    assert dl.resolve_data_root(tmp_path / "opt").origin == "--data-root"
    monkeypatch.delenv("DABENCH_DATA")
    assert dl.resolve_data_root(None).origin == "default"


# --------------------------------------------------------------------------
# digits: download, checksum, parse, pair, run
# --------------------------------------------------------------------------


def test_digits_are_downloaded_checked_parsed_and_paired(mirror, monkeypatch, tmp_path, registry):
    root = tmp_path / "data"
    files, mx, my = mnist_files()
    publish(mirror, monkeypatch, "mnist", files)
    ufiles, ux, uy = usps_files()
    publish(mirror, monkeypatch, "usps", ufiles)
    sfiles, sx, sy = svhn_files()
    publish(mirror, monkeypatch, "svhn", sfiles)
    mfiles, mmx, mmy = mnistm_files()
    publish(mirror, monkeypatch, "mnistm", mfiles)

    for name in ("mnist", "usps", "svhn", "mnistm"):
        statuses = dl.download(name, root)
        assert all(s.state == "ok" for s in statuses), statuses
        assert [s.state for s in dl.verify(name, root)] == ["ok"] * len(statuses)

    X, y = registry.datasets["mnist-full"].load(root)
    assert X.shape == (260, 1, 28, 28) and X.dtype == np.float32
    np.testing.assert_array_equal(np.round(X[:, 0] * 255).astype(np.uint8), mx)  # exact IDX round trip
    np.testing.assert_array_equal(y, my)

    X, y = registry.datasets["usps"].load(root)
    assert X.shape == (200, 1, 16, 16)
    np.testing.assert_allclose(X[:, 0] * 255.0, ux, atol=1e-3)  # (v + 1) / 2 of the [-1, 1] values
    np.testing.assert_array_equal(y, uy)  # LIBSVM labels 1..10 -> digits 0..9

    X, y = registry.datasets["svhn"].load(root)
    assert X.shape == (140, 3, 32, 32)
    np.testing.assert_array_equal(np.round(X * 255).astype(np.uint8), sx.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, sy)  # 10 -> 0

    X, y = registry.datasets["mnistm-full"].load(root)
    assert X.shape == (140, 3, 28, 28)
    np.testing.assert_array_equal(np.round(X * 255).astype(np.uint8), mmx.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, mmy)

    src, tgt = registry.datasets["usps"], registry.datasets["mnist-full"]
    split = make_split("usps:mnist-full", src, tgt, src.load(root), tgt.load(root), seed=0, protocol=Protocol())
    assert split.source_shape == split.target_shape == (1, 28, 28)  # USPS resized to MNIST's size
    assert len(split.target_test.y) == 130


def test_short_run_on_the_fixture_pair(mirror, monkeypatch, tmp_path, capsys):
    from dabench.cli import main

    root = tmp_path / "data"
    publish(mirror, monkeypatch, "mnist", mnist_files()[0])
    publish(mirror, monkeypatch, "usps", usps_files()[0])
    assert main(["data", "download", "mnist", "--data-root", str(root)]) == 0
    assert main(["data", "download", "usps", "--data-root", str(root)]) == 0
    assert main(["data", "verify", "usps", "--data-root", str(root)]) == 0
    capsys.readouterr()
    assert main(["data", "list", "--data-root", str(root)]) == 0
    listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "2/2 files" in listing["usps"] and "0/2 files" in listing["svhn"] and "manual" in listing["office31"]
    suite = write(tmp_path / "fixture.toml", """
        name = "fixture-digits"
        seeds = 1
        backbone = "lenet"
        pairs = ["mnist-full:usps"]
        [budget]
        steps = 8
        batch_size = 16
        [methods.source-only]
        [methods.dann]
        """)
    results = tmp_path / "results"
    assert main(["run", str(suite), "--results", str(results), "--data-root", str(root), "--device", "cpu"]) == 0
    from dabench.store import RunStore

    with RunStore(results, create=False) as st:
        rows = st.rows()
    assert sorted(r["status"] for r in rows) == ["ok", "ok"], [r["reason"] for r in rows]
    assert all(0.0 <= r["target_acc"] <= 1.0 for r in rows)


# --------------------------------------------------------------------------
# corrupt data is refused and not used
# --------------------------------------------------------------------------


def test_corrupt_download_is_refused_and_not_kept(mirror, monkeypatch, tmp_path):
    root = tmp_path / "data"
    files, _, _ = usps_files(40, 20)
    publish(mirror, monkeypatch, "usps", files)
    good_sha = _sha(files["usps.bz2"])
    bad = bytearray(files["usps.bz2"])
    bad[len(bad) // 2] ^= 0xFF
    (mirror / "usps" / "usps.bz2").write_bytes(bytes(bad))  # the server now sends a corrupted copy
    with pytest.raises(DataError) as e:
        dl.download("usps", root)
    msg = str(e.value)
    assert "usps.bz2" in msg and good_sha in msg
    assert not (root / "usps" / "usps.bz2").exists()  # the bad bytes were not kept


def test_md5_only_files_are_checked_and_their_sha256_recorded(mirror, monkeypatch, tmp_path):
    root = tmp_path / "data"
    files, _, _ = usps_files(30, 20)
    publish(mirror, monkeypatch, "usps", files, algo="md5")  # torchvision publishes only md5 for USPS
    assert [s.state for s in dl.download("usps", root)] == ["ok", "ok"]
    assert dl.read_pins(root / "usps") == {n: _sha(b) for n, b in files.items()}
    path = root / "usps" / "usps.t.bz2"
    path.write_bytes(b"BZh" + path.read_bytes()[3:-1])
    with pytest.raises(DataError, match=hashlib.md5(files["usps.t.bz2"]).hexdigest()):
        dl.verify("usps", root)
    assert not path.exists()


def test_file_corrupted_on_disk_is_refused_removed_and_reported(mirror, monkeypatch, tmp_path, registry):
    root = tmp_path / "data"
    files, _, _ = mnist_files(50, 20)
    publish(mirror, monkeypatch, "mnist", files)
    dl.download("mnist", root)
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    expected = _sha(files["t10k-labels-idx1-ubyte.gz"])
    with pytest.raises(DataError) as e:
        registry.datasets["mnist-full"].load(root)
    assert expected in str(e.value) and "t10k-labels-idx1-ubyte.gz" in str(e.value)
    assert not path.exists()
    with pytest.raises(DataError, match="dabench data download mnist"):
        registry.datasets["mnist-full"].load(root)
    # a fresh process checks against the registry's real MNIST hashes: the fixture files are refused too
    r = run_cli("data", "verify", "mnist", "--data-root", str(root))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "train-images-idx3-ubyte.gz" in r.stderr and "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609" in r.stderr
    assert not (root / "mnist" / "train-images-idx3-ubyte.gz").exists()


# --------------------------------------------------------------------------
# image folders, image lists, reviews, .mat features
# --------------------------------------------------------------------------


def test_office31_folders_download_pin_and_load(mirror, monkeypatch, tmp_path, registry):
    from dabench.data.standard import OFFICE31_CLASSES

    root = tmp_path / "data"
    files = office31_files(top="domain_adaptation_images/")  # either archive layout is read
    publish(mirror, monkeypatch, "office31", files, pin=False)  # no upstream hash: trust on first use
    statuses = dl.download("office31", root)
    assert [s.state for s in statuses] == ["pinned"]
    assert _sha(files["domain_adaptation_images.tar.gz"]) in (root / "office31" / "SHA256SUMS").read_text()
    X, y = registry.datasets["office31-webcam"].load(root)
    # streamed: the loader lists the files, nothing is decoded until a batch asks
    assert len(X) == 62 and X.item_shape == (3, 224, 224) and X.shape == (62, 3 * 224 * 224)
    assert np.bincount(y).tolist() == [2] * len(OFFICE31_CLASSES)
    for label in (0, 17, 30):  # the class folder decides the label: the fixture colours encode it
        i = int(np.flatnonzero(y == label)[0])
        pixels = X.images([i])[0]
        np.testing.assert_allclose(pixels[:, 100, 100], class_colour(label), atol=6)
    # head protocol: the feature domain extracts once through the cache under <root>/features
    from dabench import image_backbones

    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(DataError, match="needs torchvision"):
            registry.datasets["office31-webcam@resnet50"].load(root)
    calls: list = []
    monkeypatch.setattr(image_backbones, "get_feature_extractor", lambda name: _counting_extractor(calls))
    F1, yf = registry.datasets["office31-webcam@resnet50"].load(root)
    F2, _ = registry.datasets["office31-webcam@resnet50"].load(root)
    assert sum(calls) == 62 and F1.shape == (62, 3) and np.array_equal(F1, F2) and np.array_equal(yf, y)
    assert len(list((root / "features" / "office31-webcam@meanrgb").glob("*.npz"))) == 1
    # a pinned archive that changes afterwards is refused like an upstream mismatch
    archive = root / "office31" / "domain_adaptation_images.tar.gz"
    archive.write_bytes(archive.read_bytes() + b"tampered")
    with pytest.raises(DataError, match="pinned"):
        dl.verify("office31", root)
    assert not archive.exists()


def _tiny_pretrained_backbone(shape):
    """A stand-in for the ImageNet ResNet-50 on CPU: 8x average pooling, one
    conv, global pooling (16-d), marked pretrained like the ResNets."""
    from torch import nn

    from dabench.backbones import _Unflatten, mark_pretrained

    net = nn.Sequential(_Unflatten(tuple(shape)), nn.AvgPool2d(8), nn.Conv2d(shape[0], 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return mark_pretrained(net, "test stand-in for torchvision ResNet50_Weights.IMAGENET1K_V1"), 16


def test_office31_suite_runs_end_to_end_on_a_fixture_folder(mirror, monkeypatch, tmp_path):
    """suites/office31.toml's pipeline on an Office-31-layout fixture (CPU, a tiny
    backbone in place of ResNet-50): streamed images, training batches augmented
    (random resized crop + flip), the backbone at 0.1x the heads' learning rate."""
    import dabench_plugins.dann as dann_plugin
    from dabench.contract import Budget
    from dabench.data.stream import ImageStream
    from dabench.plugins import get_registry
    from dabench.runner import Runner
    from dabench.store import RunStore
    from dabench.suite import parse_suite
    from dabench.training import TensorBatches

    root = tmp_path / "data"
    publish(mirror, monkeypatch, "office31", office31_files(per_class=5), pin=False)
    dl.download("office31", root)
    registry = get_registry()
    monkeypatch.setitem(registry.backbones, "resnet50", _tiny_pretrained_backbone)
    suite = parse_suite(Path(__file__).resolve().parents[1] / "suites" / "office31.toml", registry, data_root=root)
    assert suite.pairs[0].protocol.augment == "crop-flip" and suite.backbone == "resnet50"
    suite = suite.restrict(methods=["dann"], pairs=["office31-amazon:office31-webcam"], seeds=1)
    suite.pairs = [dataclasses.replace(p, budget=Budget(steps=4, batch_size=8)) for p in suite.pairs]
    optimisers, streams = [], []

    def recording_sgd(*args, **kwargs):
        opt = dl_make_sgd(*args, **kwargs)
        optimisers.append(opt)
        return opt

    class RecordingBatches(TensorBatches):
        def __init__(self, X, *args, **kwargs):
            super().__init__(X, *args, **kwargs)
            streams.append((X, self.augment))

    dl_make_sgd = dann_plugin.make_sgd
    monkeypatch.setattr(dann_plugin, "make_sgd", recording_sgd)
    monkeypatch.setattr(dann_plugin, "TensorBatches", RecordingBatches)
    store = RunStore(tmp_path / "runs.sqlite")
    # in this process: the registry and the plugin are patched here, which a worker process would not see
    from dabench.executors import InProcessExecutor

    summary = Runner(registry, store, data_root=root).run(suite, executor=InProcessExecutor(threads=1))
    assert summary.ok == 2 and summary.failed == 0, store.statuses()  # the lambda_max grid: 2 runs
    # streamed domains, both batch streams augmented with the suite's transform
    assert len(streams) == 4 and all(isinstance(X, ImageStream) and aug == "crop-flip" for X, aug in streams)
    assert {len(X) for X, _ in streams} == {93, 62}  # 3 of 5 amazon images per class (60%), 2 of 5 webcam
    # the optimiser: the backbone group at 0.1x the heads' learning rate, after the last annealing step
    for opt in optimisers:
        groups = {g["name"]: g for g in opt.param_groups}
        assert groups["backbone"]["lr_mult"] == 0.1 and groups["heads"]["lr_mult"] == 1.0
        assert groups["backbone"]["lr"] == pytest.approx(0.1 * groups["heads"]["lr"])
        assert groups["heads"]["lr"] < 0.01  # annealed from the suite's lr = 0.01
        assert len(groups["backbone"]["params"]) == 2  # the stand-in's one conv: weight and bias


def test_officehome_zip_and_visda_lists(mirror, monkeypatch, tmp_path):
    from dabench.data.standard import IMAGE_DOMAINS, OFFICEHOME_CLASSES, VISDA_CLASSES

    root = tmp_path / "data"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for dom in ("Art", "Clipart", "Product", "Real World"):
            for c in OFFICEHOME_CLASSES:
                zf.writestr(f"OfficeHomeDataset_10072016/{dom}/{c}/00001.jpg", jpeg((10, 20, 30)))
    publish(mirror, monkeypatch, "officehome", {"OfficeHomeDataset_10072016.zip": buf.getvalue()}, pin=False)
    visda = {}
    for arc, folder in (("train.tar", "train"), ("validation.tar", "validation")):
        members, lines = {}, []
        for label, c in enumerate(VISDA_CLASSES):
            rel = f"{c}/img_{label}.jpg"
            members[f"{folder}/{rel}"] = jpeg(class_colour(label))
            lines.append(f"{rel} {label}")
        members[f"{folder}/image_list.txt"] = ("\n".join(lines) + "\n").encode()
        visda[arc] = tar_gz(members)
    publish(mirror, monkeypatch, "visda2017", visda, pin=False)
    dl.download("officehome", root)
    dl.download("visda2017", root)

    items = IMAGE_DOMAINS["officehome-realworld"].items(root)  # "Real World" has a space
    assert len(items) == 65 and [lbl for _, lbl in items] == list(range(65))
    items = IMAGE_DOMAINS["visda-real"].items(root)
    assert [lbl for _, lbl in items] == list(range(12))
    assert all(p.is_file() and p.parent.name == VISDA_CLASSES[lbl] for p, lbl in items)


def review_line(words: dict[str, int], label: str) -> str:
    return " ".join(f"{w}:{c}" for w, c in words.items()) + f" #label#:{label}"


def test_amazon_processed_reviews(mirror, monkeypatch, tmp_path, registry):
    from dabench.data import standard

    members = {}
    for dom in standard.AMAZON_DOMAINS:
        for label in ("positive", "negative"):
            lines = [review_line({"great" if label == "positive" else "awful": 1, f"{dom}_word": 2,
                                  "the_product": 1, f"rare_{dom}_{i}": 1}, label) for i in range(10)]
            members[f"processed_acl/{dom}/{label}.review"] = ("\n".join(lines) + "\n").encode()
        members[f"processed_acl/{dom}/unlabeled.review"] = (review_line({"x": 1}, "unknown") + "\n").encode()
    publish(mirror, monkeypatch, "amazon", {"processed_acl.tar.gz": tar_gz(members)}, pin=False)
    root = tmp_path / "data"
    dl.download("amazon", root)
    monkeypatch.setattr(standard, "AMAZON_VOCAB", 8)
    docs = standard._amazon_docs(str(root / "amazon"))
    vocab = standard.amazon_vocabulary(docs, size=8)
    # document frequency over all domains: the shared words first, then each domain's own word
    assert vocab[:3] == ["the_product", "awful", "great"]
    assert set(vocab[3:7]) == {f"{d}_word" for d in standard.AMAZON_DOMAINS}
    X, y = standard.load_amazon("dvd", root)
    assert X.shape == (20, 8) and set(np.unique(X)) == {0.0, 1.0}
    assert y.tolist() == [1] * 10 + [0] * 10
    great = vocab.index("great")
    np.testing.assert_array_equal(X[:, great], y.astype(np.float32))
    assert registry.datasets["amazon-dvd"].shape == (5000,)


def test_office_caltech_surf_decaf_heterogeneous_pair(mirror, monkeypatch, tmp_path, registry):
    from dabench.data.standard import OC10_DOMAINS

    files = {}
    for dom, (surf, decaf) in OC10_DOMAINS.items():
        y = (np.arange(40) % 10 + 1)[:, None].astype(np.uint8)
        files[surf] = mat_bytes(fts=RNG.integers(0, 5, size=(40, 800)).astype(np.float64), labels=y)
        files[decaf] = mat_bytes(feas=RNG.random((40, 4096)), labels=y)
    publish(mirror, monkeypatch, "office-caltech10", files, pin=False)
    root = tmp_path / "data"
    statuses = dl.download("office-caltech10", root)
    assert {s.state for s in statuses} == {"pinned"}
    Xs, ys = registry.datasets["oc10-amazon-surf"].load(root)
    Xt, yt = registry.datasets["oc10-webcam-decaf"].load(root)
    assert Xs.shape == (40, 800) and Xt.shape == (40, 4096)
    np.testing.assert_allclose(Xs.mean(0), 0, atol=1e-5)  # GFK normalisation: z-scored per domain
    assert ys.min() == 0 and ys.max() == 9
    split = make_split("oc10-amazon-surf:oc10-webcam-decaf", registry.datasets["oc10-amazon-surf"],
                       registry.datasets["oc10-webcam-decaf"], (Xs, ys), (Xt, yt), seed=0,
                       protocol=Protocol(feature_space="native"))
    assert not split.same_feature_space and split.source_train.X.shape[1] == 800


# --------------------------------------------------------------------------
# the head protocol's feature cache
# --------------------------------------------------------------------------


def _counting_extractor(calls: list, weights: str = "w1"):
    from dabench.data.features import FeatureExtractor

    def build():
        def extract(batch):
            calls.append(len(batch))
            return batch.reshape(len(batch), 3, -1).mean(-1).astype(np.float32) / 255.0

        return extract

    return FeatureExtractor("meanrgb", weights, "test", 3, build, resize=16, crop=8, batch_size=4)


def test_feature_cache_reuses_rebuilds_corrupt_and_stale_entries(tmp_path):
    from dabench.data.features import cached_features

    img_dir = tmp_path / "data" / "imgs"
    img_dir.mkdir(parents=True)
    items = []
    for label in range(3):
        p = img_dir / f"{label}.jpg"
        p.write_bytes(jpeg(class_colour(label * 10)))
        items.append((p, label))
    cache = tmp_path / "data" / "features"
    calls: list = []
    X1, y1 = cached_features("toy", items, _counting_extractor(calls), cache)
    assert sum(calls) == 3 and X1.shape == (3, 3)
    np.testing.assert_allclose(X1[1] * 255, class_colour(10), atol=6)
    X2, _ = cached_features("toy", items, _counting_extractor(calls), cache)
    assert sum(calls) == 3  # served from the cache, not extracted again
    np.testing.assert_array_equal(X1, X2)

    (npz,) = (cache / "toy@meanrgb").glob("*.npz")
    data = bytearray(npz.read_bytes())
    data[-30] ^= 0xFF
    npz.write_bytes(bytes(data))  # corrupt entry: its sha256 no longer matches the manifest
    X3, _ = cached_features("toy", items, _counting_extractor(calls), cache)
    assert sum(calls) == 6
    np.testing.assert_array_equal(X1, X3)

    cached_features("toy", items, _counting_extractor(calls, weights="w2"), cache)  # other weights: new key
    assert sum(calls) == 9
    items[0][0].write_bytes(jpeg((250, 250, 250)))  # an image changed: the entry is stale
    X4, _ = cached_features("toy", items, _counting_extractor(calls, weights="w2"), cache)
    assert sum(calls) == 12 and X4[0, 0] * 255 > 240
    assert len(list((cache / "toy@meanrgb").glob("*.npz"))) == 1  # stale entries removed


# --------------------------------------------------------------------------
# backbones
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,dim", [("lenet", (1, 28, 28), 500), ("dtn", (3, 32, 32), 512),
                                            ("lenet", (3, 32, 32), 500)])
def test_digit_backbones(registry, name, shape, dim):
    import torch

    net, out = registry.backbones[name](shape)
    assert out == dim
    net.eval()
    x = torch.rand(4, int(np.prod(shape)))
    f = net(x)
    assert f.shape == (4, dim)
    assert torch.isfinite(f).all()


def test_resnet_backbones_are_registered_without_importing_torchvision(registry):
    import sys

    assert "resnet50" in registry.backbones and "resnet101" in registry.backbones
    assert "torchvision" not in sys.modules  # registration and the CPU path never import it


def test_resnet50_end_to_end_backbone(registry, monkeypatch):
    pytest.importorskip("torchvision", reason="torchvision is not installed (the ResNet backbones need it)")
    import torch

    from dabench import image_backbones

    monkeypatch.setattr(image_backbones, "PRETRAINED", False)  # no weight download in tests

    net, out = registry.backbones["resnet50"]((3, 64, 64))
    assert out == 2048
    assert net.eval()(torch.rand(2, 3 * 64 * 64)).shape == (2, 2048)


# --------------------------------------------------------------------------
# suites: the training protocol and per-pair backbones
# --------------------------------------------------------------------------

HEAD_SUITE = """
name = "h"
seeds = 1
backbone = "mlp"
pairs = [PAIRS]
[protocol]
TRAINING
[methods.source-only]
"""


def _suite(tmp_path, pairs: str, training: str = ""):
    return write(tmp_path / "s.toml", HEAD_SUITE.replace("PAIRS", pairs).replace("TRAINING", training))


def test_head_protocol_is_checked_and_lands_in_the_run_key(registry, tmp_path):
    from dabench.suite import SuiteError, parse_suite

    feats = '"office31-amazon@resnet50:office31-webcam@resnet50"'
    with pytest.raises(SuiteError, match='set training = "head"'):
        parse_suite(_suite(tmp_path, feats), registry)
    with pytest.raises(SuiteError, match="cached-feature domains"):
        parse_suite(_suite(tmp_path, '"office31-amazon:office31-webcam"', 'training = "head"'), registry)
    with pytest.raises(SuiteError, match="protocol.training"):
        parse_suite(_suite(tmp_path, feats, 'training = "frozen"'), registry)
    head = parse_suite(_suite(tmp_path, feats, 'training = "head"'), registry)
    assert head.pairs[0].protocol.as_dict()["training"] == "head"
    e2e = parse_suite(_suite(tmp_path, '"office31-amazon:office31-webcam"', 'training = "end-to-end"'), registry)
    # the default is left out of the stored protocol, so older run keys are unchanged
    assert "training" not in e2e.pairs[0].protocol.as_dict()
    assert Protocol(training="head").as_dict() != Protocol().as_dict()


def test_pairs_may_override_the_backbone(registry, tmp_path):
    from dabench.suite import SuiteError, parse_suite

    path = _suite(tmp_path, '"mnist-full:usps", { pair = "svhn:mnist-full", backbone = "dtn" }')
    specs = parse_suite(path, registry).expand(registry)
    assert {(s.pair.name, s.backbone) for s in specs} == {("mnist-full:usps", "mlp"), ("svhn:mnist-full", "dtn")}
    assert len({s.key for s in specs}) == 2
    with pytest.raises(SuiteError, match="unknown backbone"):
        parse_suite(_suite(tmp_path, '{ pair = "svhn:mnist-full", backbone = "nope" }'), registry)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_run_with_missing_data_says_so_once_per_dataset_and_stores_nothing(tmp_path, jobs):
    """A suite whose data is absent: each dataset's message (file, place, the
    download command) once in the progress and once at the end, exit 1, and
    no run stored, so that the same command runs them once the data is there
    (no --retry-failed needed)."""
    import sqlite3

    suite = write(tmp_path / "s.toml", """
        name = "nodata"
        seeds = 2
        backbone = "lenet"
        pairs = ["mnist-full:usps", "usps:mnist-full"]
        [budget]
        steps = 4
        batch_size = 8
        [methods.source-only]
        [methods.dann]
        """)
    empty, results = tmp_path / "empty", tmp_path / "results"
    empty.mkdir()
    args = ["run", str(suite), "--results", str(results), "--data-root", str(empty), "--device", "cpu"]
    r = run_cli(*args, *(["--jobs", jobs] if jobs else []))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "8 runs did not run because their data is missing" in r.stderr
    for name, n in (("mnist", 4), ("usps", 2)):
        msg = f"dataset '{name}': {n} of {n} file(s) missing"
        assert r.stderr.count(msg) == 2, r.stderr  # first time in the progress, then in the summary
        assert f"dabench data download {name} --data-root {empty}" in r.stderr
    with sqlite3.connect(results / "runs.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)


def test_export_npz_makes_the_reproduction_arrays_from_a_download(mirror, monkeypatch, tmp_path):
    """scripts/export_npz.py turns the downloaded USPS (LIBSVM, [-1, 1]) into
    the uint8 npz a suite's [domains] table reads: the same pixels, the
    same labels, rows sliced on request."""
    from dabench.cli import main
    from dabench.data.files import parse_domain_table

    spec_ = importlib.util.spec_from_file_location("export_npz", Path(__file__).parents[1] / "scripts" / "export_npz.py")
    export = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(export)
    root = tmp_path / "data"
    files, x, y = usps_files(30, 10)
    publish(mirror, monkeypatch, "usps", files)
    assert main(["data", "download", "usps", "--data-root", str(root)]) == 0
    out = tmp_path / "arrays" / "usps.npz"
    assert export.main(["usps", str(out), "--data-root", str(root)]) == 0
    d = np.load(out)
    assert d["X"].dtype == np.uint8 and d["X"].shape == (40, 1, 16, 16)
    # the LIBSVM copy keeps 6 decimals of v/127.5 - 1: every pixel comes back exactly
    np.testing.assert_array_equal(d["X"].reshape(40, 16, 16), x)
    np.testing.assert_array_equal(d["y"], y)
    spec = parse_domain_table("usps-real", {"path": "usps.npz", "format": "npz", "label_space": "digits10"},
                              suite_dir=tmp_path, data_root=out.parent, registered={})
    X, Y = spec.load(None)
    assert X.shape == (40, 1, 16, 16) and np.allclose(X * 255, x[:, None].astype(np.float32), atol=1e-3)
    assert export.main(["usps", str(tmp_path / "part.npz"), "--data-root", str(root), "--rows", "30:40"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "part.npz")["y"], y[30:])
    with pytest.raises(SystemExit, match="40 rows"):
        export.main(["usps", str(tmp_path / "bad.npz"), "--data-root", str(root), "--rows", "30:50"])
    with pytest.raises(SystemExit, match="did you mean 'usps'"):
        export.main(["uspss", str(tmp_path / "bad.npz")])
