"""Checked downloads of the standard datasets, and the data root.

The data root is, in order: the ``--data-root`` option (``data_root``
argument), the ``DABENCH_DATA`` environment variable, or the per-user cache
folder (``pooch.os_cache("dabench")``: ``~/.cache/dabench`` on Linux,
``~/Library/Caches/dabench`` on macOS).  Dataset ``NAME`` lives in
``<root>/<NAME>/``.

Every file of :data:`DATASETS` is checked before it is used:

- files with an **upstream hash** (``sha256``, or only an ``md5`` where that
  is all the upstream publishes) are verified against it; the registry says
  where each hash comes from (``hash_source``);
- files **without an upstream hash** (``sha256=None`` and ``md5=None``) are
  verified against a *local pin*: the line for the file in
  ``<root>/<NAME>/SHA256SUMS`` (``sha256sum`` format).  A user may write that
  file from a trusted source before downloading; otherwise the first
  successful download writes it (trust on first use).  ``dabench data verify``
  reports such files as *pinned locally*, never as verified upstream, and as
  *UNVERIFIED* while no pin exists;
- every file also gets a cheap format check (gzip/bz2/MAT/tar/zip magic), so
  an HTML error page saved in place of an archive is refused even where no
  hash is known.

A file that fails a check is removed (it is never used or kept) and the
error names the file, the expected hash and its source, and what to run.
Missing data raises one :class:`~dabench.data.core.DataError` naming the file,
the place it was looked for, and the exact ``dabench data download NAME``
command, or the manual steps for datasets behind a licence form or a
download page that cannot be fetched by a program (Google Drive, MEGA).

Archives are extracted into ``<root>/<NAME>/`` (safely: no absolute paths,
no ``..``, no links leaving the folder) through a temporary folder, and a
marker ``.<archive>.extracted`` records the sha256 of the archive that was
extracted; loaders trust the marker instead of re-hashing multi-GB archives
on every load (``dabench data verify NAME`` re-hashes them).

A mirror (``DABENCH_MIRROR=https://host/path``) replaces every upstream URL,
manual datasets included, by ``<mirror>/<dataset>/<file>``; the files are
checked exactly as upstream downloads are.

Plain ``http://`` is refused for a file that has neither an upstream hash
nor a local pin (its first download would be pinned, trusting whatever the
network delivered), from a mirror or upstream alike, unless the user says so
explicitly: ``DABENCH_ALLOW_HTTP=1`` (or ``dabench data download --allow-http``).
Files with a hash or a pin are checked against it, so ``http://`` is safe
for them.  Upstream URLs are https where the host serves it.

Archives never write dabench's own bookkeeping: a member named
``SHA256SUMS`` or like an extraction marker (``.<archive>.extracted``) at the
top of an archive is skipped with a warning, so an archive cannot re-pin
other files or fake an extraction.

Downloads use pooch (imported lazily; ``pip install pooch``).  Progress goes
to pooch's progress bar when ``tqdm`` is installed and the caller asks for it,
and to logging otherwise; this module never prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..atomic import atomic_write_text, unique_tmp
from .core import DataError

log = logging.getLogger("dabench.data")

ENV_VAR = "DABENCH_DATA"
#: Environment variable naming a mirror: a base URL under which every file is
#: fetched as ``<mirror>/<dataset>/<file name>`` instead of from its upstream
#: URLs (a lab-wide copy, or the loopback server of the tests).  Hashes are
#: still checked against the registry (or the local pins): a mirror cannot
#: change what is accepted.
MIRROR_VAR = "DABENCH_MIRROR"
#: ``1`` accepts plain-http downloads of files without any hash or pin (see the module docstring)
ALLOW_HTTP_VAR = "DABENCH_ALLOW_HTTP"
PINS_FILE = "SHA256SUMS"

__all__ = [
    "DATASETS",
    "DataRoot",
    "Dataset",
    "FileStatus",
    "RemoteFile",
    "dataset_fingerprint",
    "default_data_root",
    "download",
    "get_dataset",
    "require_extracted",
    "require_file",
    "resolve_data_root",
    "sha256_file",
    "verify",
]


# --------------------------------------------------------------------------
# registry types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset, stored as ``<root>/<dataset>/<name>``.

    - ``urls``: direct download URLs, tried in order; empty when the file
      must be fetched by hand (see :attr:`Dataset.manual`).
    - ``sha256`` / ``md5``: the upstream hash, or ``None`` where no upstream
      hash could be verified when this registry was written (then the local
      pin in ``SHA256SUMS`` is used; see the module docstring).
    - ``hash_source``: where the upstream hash was taken from.
    - ``size``: expected size in bytes when known from the same source.
    - ``kind``: format check before use: ``gzip``, ``bz2``, ``mat``, ``tar``
      (any compression), ``zip`` or ``any``.
    - ``extract``: an archive to extract into the dataset folder.
    """

    name: str
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    hash_source: str = ""
    kind: str = "any"
    extract: bool = False


@dataclass(frozen=True)
class Dataset:
    """A downloadable dataset: its files, provenance and the domains it feeds."""

    name: str
    title: str
    files: tuple[RemoteFile, ...]
    homepage: str
    licence: str
    citation: str
    domains: tuple[str, ...] = ()
    #: manual steps (one string per step) when some files have no URL
    manual: tuple[str, ...] = ()
    notes: str = ""


# Hash sources (looked up when this registry was written):
_TFDS = "TensorFlow Datasets url_checksums ({}), github.com/tensorflow/datasets"
_TORCHVISION_USPS = "torchvision/datasets/usps.py (md5 only), github.com/pytorch/vision"
_LIYXI = "mnist_m.py of github.com/liyxi/mnist-m (md5 only)"

_MNIST_URLS = ("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")


def _mnist_file(name: str, sha256: str, size: int) -> RemoteFile:
    return RemoteFile(name, tuple(u + name for u in _MNIST_URLS), sha256=sha256, size=size,
                      hash_source=_TFDS.format("mnist.txt"), kind="gzip")


DATASETS: dict[str, Dataset] = {}


def _add(ds: Dataset) -> None:
    DATASETS[ds.name] = ds


_add(Dataset(
    name="mnist",
    title="MNIST (IDX files)",
    files=(
        _mnist_file("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
        _mnist_file("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
        _mnist_file("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
        _mnist_file("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
    ),
    homepage="http://yann.lecun.com/exdb/mnist/",
    licence="CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. J. C. Burges)",
    citation="LeCun et al., Gradient-based learning applied to document recognition, Proc. IEEE 1998",
    domains=("mnist-full",),
))

_add(Dataset(
    name="usps",
    title="USPS (LIBSVM bz2 files)",
    files=(
        RemoteFile("usps.bz2", ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.bz2",),
                   md5="ec16c51db3855ca6c91edd34d0e9b197", hash_source=_TORCHVISION_USPS, kind="bz2"),
        RemoteFile("usps.t.bz2", ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.t.bz2",),
                   md5="8ea070ee2aca1ac39742fdd1ef5ed118", hash_source=_TORCHVISION_USPS, kind="bz2"),
    ),
    homepage="https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps",
    licence="no licence stated upstream; redistributed by the LIBSVM data page for research use",
    citation="Hull, A database for handwritten text recognition research, IEEE TPAMI 1994",
    domains=("usps",),
    notes="The LIBSVM copy (7,291 train + 2,007 test, 16x16, values in [-1, 1], labels 1..10) "
          "is the one torchvision reads.  The Kaggle `usps.h5` needs a Kaggle login and has no "
          "published hash, so it is not used.",
))

_add(Dataset(
    name="svhn",
    title="SVHN cropped digits (format 2 .mat files)",
    files=(
        RemoteFile("train_32x32.mat", ("https://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                                       "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"),
                   sha256="435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8", size=182040794,
                   hash_source=_TFDS.format("svhn_cropped.txt"), kind="mat"),
        RemoteFile("test_32x32.mat", ("https://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                                      "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"),
                   sha256="cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b", size=64275384,
                   hash_source=_TFDS.format("svhn_cropped.txt"), kind="mat"),
    ),
    homepage="http://ufldl.stanford.edu/housenumbers/",
    licence="non-commercial use only (see the SVHN page)",
    citation="Netzer et al., Reading digits in natural images with unsupervised feature learning, NIPS workshop 2011",
    domains=("svhn",),
))

_add(Dataset(
    name="mnistm",
    title="MNIST-M (liyxi/mnist-m release: torch tensors in .pt.tar.gz)",
    files=(
        RemoteFile("mnist_m_train.pt.tar.gz", ("https://github.com/liyxi/mnist-m/releases/download/data/mnist_m_train.pt.tar.gz",),
                   md5="191ed53db9933bd85cc9700558847391", hash_source=_LIYXI, kind="tar", extract=True),
        RemoteFile("mnist_m_test.pt.tar.gz", ("https://github.com/liyxi/mnist-m/releases/download/data/mnist_m_test.pt.tar.gz",),
                   md5="e11cb4d7fff76d7ec588b1134907db59", hash_source=_LIYXI, kind="tar", extract=True),
    ),
    homepage="https://github.com/liyxi/mnist-m",
    licence="derived from MNIST (CC BY-SA 3.0) and BSDS500 photos; no separate licence stated",
    citation="Ganin & Lempitsky, Unsupervised domain adaptation by backpropagation, ICML 2015",
    domains=("mnistm-full",),
    notes="Each archive holds one file written by torch.save: a (uint8 images (n, 28, 28, 3), int64 "
          "labels) pair, converted by liyxi/mnist-m from keras_mnistm.pkl.gz (VanushVaswani/keras_mnistm), "
          "which generates MNIST-M from the MNIST train/test images in order.  Read with "
          "torch.load(weights_only=True).  Ganin's original mnist_m.tar.gz (PNG folders) is on Google "
          "Drive only and is not read by this loader.",
))

_add(Dataset(
    name="office31",
    title="Office-31 (images)",
    files=(RemoteFile("domain_adaptation_images.tar.gz", kind="tar", extract=True),),
    homepage="https://faculty.cc.gatech.edu/~judy/domainadapt/",
    licence="research use (Saenko et al.); no redistribution licence stated",
    citation="Saenko et al., Adapting visual category models to new domains, ECCV 2010",
    domains=("office31-amazon", "office31-dslr", "office31-webcam"),
    manual=(
        "open https://drive.google.com/file/d/0B4IapRTv9pJ1WGZVd1VDMmhwdlE (linked from "
        "https://faculty.cc.gatech.edu/~judy/domainadapt/) and download domain_adaptation_images.tar.gz "
        "(Google Drive asks for a confirmation, so a program cannot fetch it; `gdown` can)",
        "put domain_adaptation_images.tar.gz into {dir}",
        "run `{command}` to record its sha256 and extract it (to {dir}/{{amazon,dslr,webcam}}/images/<class>/*.jpg; "
        "a copy you already extracted into that layout is also accepted, unverified)",
    ),
))

_add(Dataset(
    name="officehome",
    title="Office-Home (images)",
    files=(RemoteFile("OfficeHomeDataset_10072016.zip", kind="zip", extract=True),),
    homepage="https://www.hemanthdv.org/officeHomeDataset.html",
    licence="research and educational use only, under the terms accepted on the download form",
    citation="Venkateswara et al., Deep hashing network for unsupervised domain adaptation, CVPR 2017",
    domains=("officehome-art", "officehome-clipart", "officehome-product", "officehome-realworld"),
    manual=(
        "open https://www.hemanthdv.org/officeHomeDataset.html, accept the terms of use on the form and "
        "download OfficeHomeDataset_10072016.zip",
        "put OfficeHomeDataset_10072016.zip into {dir}",
        "run `{command}` to record its sha256 and extract it (to {dir}/OfficeHomeDataset_10072016/"
        "{{Art,Clipart,Product,Real World}}/<class>/*.jpg; a copy you already extracted into that layout is "
        "also accepted, unverified)",
    ),
))

_add(Dataset(
    name="visda2017",
    title="VisDA-2017 classification (synthetic train, real validation)",
    files=(
        # no published hash: the https URL first; the plain-http one only with DABENCH_ALLOW_HTTP=1
        RemoteFile("train.tar", ("https://csr.bu.edu/ftp/visda17/clf/train.tar",
                                 "http://csr.bu.edu/ftp/visda17/clf/train.tar"), kind="tar", extract=True),
        RemoteFile("validation.tar", ("https://csr.bu.edu/ftp/visda17/clf/validation.tar",
                                      "http://csr.bu.edu/ftp/visda17/clf/validation.tar"), kind="tar", extract=True),
    ),
    homepage="https://github.com/VisionLearningGroup/taskcv-2017-public/tree/master/classification",
    licence="research use (VisDA challenge terms; the synthetic part renders ShapeNet models)",
    citation="Peng et al., VisDA: The visual domain adaptation challenge, arXiv:1710.06924, 2017",
    domains=("visda-synthetic", "visda-real"),
    notes="train.tar is about 7.7 GB, validation.tar about 2 GB.  Each extracts to a folder with "
          "class sub-folders and an image_list.txt (`relative/path label` per line).",
))

_add(Dataset(
    name="amazon",
    title="Amazon reviews, Multi-Domain Sentiment Dataset (processed_acl)",
    files=(RemoteFile("processed_acl.tar.gz", ("https://www.cs.jhu.edu/~mdredze/datasets/sentiment/processed_acl.tar.gz",),
                      kind="tar", extract=True),),
    homepage="https://www.cs.jhu.edu/~mdredze/datasets/sentiment/",
    licence="research use; no licence stated upstream",
    citation="Blitzer et al., Biographies, Bollywood, boom-boxes and blenders: domain adaptation for "
             "sentiment classification, ACL 2007",
    domains=("amazon-books", "amazon-dvd", "amazon-electronics", "amazon-kitchen"),
))

_OC10_SURF = ("amazon_SURF_L10.mat", "Caltech10_SURF_L10.mat", "dslr_SURF_L10.mat", "webcam_SURF_L10.mat")
_OC10_DECAF = ("amazon_decaf.mat", "caltech_decaf.mat", "dslr_decaf.mat", "webcam_decaf.mat")

_add(Dataset(
    name="office-caltech10",
    title="Office-Caltech10 SURF (800-d) and DeCAF6 (4096-d) features (.mat)",
    files=tuple(RemoteFile(n, kind="mat") for n in _OC10_SURF + _OC10_DECAF),
    homepage="https://github.com/jindongwang/transferlearning/tree/master/data",
    licence="research use; features of Office (Saenko et al.) and Caltech-256 (Griffin et al.) images",
    citation="Gong et al., Geodesic flow kernel for unsupervised domain adaptation, CVPR 2012 (SURF); "
             "Donahue et al., DeCAF, ICML 2014",
    domains=tuple(f"oc10-{d}-{f}" for f in ("surf", "decaf") for d in ("amazon", "caltech", "dslr", "webcam")),
    manual=(
        "open https://github.com/jindongwang/transferlearning/blob/master/data/dataset.md (section "
        "Office+Caltech) and download the 'SURF' and 'DeCAF' archives (MEGA or Jianguoyun links, not "
        "fetchable by a program)",
        "unpack them and put the eight .mat files (" + ", ".join(_OC10_SURF + _OC10_DECAF) + ") into {dir}",
        "run `{command}` to record their sha256",
    ),
    notes="SURF files hold `fts` (n x 800 bag-of-SURF histograms) and `labels` (1..10); DeCAF files "
          "hold `feas` (n x 4096) and `labels`.",
))


_add(Dataset(
    name="office-caltech10-images",
    title="Office-Caltech10 images (the 10 classes shared by Office-31 and Caltech-256)",
    files=(RemoteFile("officecaltech.tgz", ("https://cloud.tsinghua.edu.cn/f/e93f2e07d93243d6b57e/?dl=1",),
                      kind="tar", extract=True),),
    homepage="https://github.com/thuml/Transfer-Learning-Library (tllib/vision/datasets/officecaltech.py)",
    licence="research use; images of Office-31 (Saenko et al.) and Caltech-256 (Griffin et al.)",
    citation="Gong et al., Geodesic flow kernel for unsupervised domain adaptation, CVPR 2012",
    domains=("oc10-amazon", "oc10-caltech", "oc10-dslr", "oc10-webcam"),
    notes="The archive TLlib's OfficeCaltech loader downloads (no upstream hash: pinned on first use).  It "
          "extracts to {amazon,caltech,dslr,webcam}/<class>/*.jpg (an extra images/ level is also read) with "
          "TLlib's class names back_pack, bike, calculator, headphones, keyboard, laptop_computer, monitor, "
          "mouse, mug, projector.  Layout taken from TLlib's loader; not checked against the archive when "
          "this entry was written (no network to that host).",
))


def mirror() -> str | None:
    """The mirror base URL from ``DABENCH_MIRROR``, or None."""
    m = os.environ.get(MIRROR_VAR, "").strip()
    return m.rstrip("/") if m else None


def http_allowed() -> bool:
    """Whether the user accepts plain-http downloads of unhashed, unpinned files."""
    return os.environ.get(ALLOW_HTTP_VAR, "").strip().lower() in ("1", "true", "yes")


def file_urls(ds: Dataset, f: RemoteFile) -> tuple[str, ...]:
    """Where ``f`` is fetched from: the mirror when one is set, else its upstream URLs."""
    m = mirror()
    if m:
        return (f"{m}/{ds.name}/{f.name}",)
    return f.urls


def get_dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))} "
                        f"(`dabench data list` shows them)") from None


# --------------------------------------------------------------------------
# data root
# --------------------------------------------------------------------------


def default_data_root() -> Path:
    """The per-user cache folder ``dabench`` (pooch.os_cache / platformdirs)."""
    try:
        import pooch

        return Path(pooch.os_cache("dabench"))
    except ImportError:
        try:
            import platformdirs

            return Path(platformdirs.user_cache_dir("dabench"))
        except ImportError:
            return Path.home() / ".cache" / "dabench"


@dataclass(frozen=True)
class DataRoot:
    """A resolved data root and where it came from (for messages)."""

    path: Path
    origin: str  # "--data-root", "DABENCH_DATA" or "default"

    def command(self, dataset: str, action: str = "download") -> str:
        cmd = f"dabench data {action} {dataset}"
        if self.origin == "--data-root":
            cmd += f" --data-root {shlex.quote(str(self.path))}"
        return cmd

    def describe(self) -> str:
        if self.origin == "--data-root":
            return f"data root {self.path} (from --data-root)"
        if self.origin == ENV_VAR:
            return f"data root {self.path} (from {ENV_VAR})"
        return f"data root {self.path} (the default; set {ENV_VAR} or --data-root to change it)"


def resolve_data_root(data_root: str | os.PathLike | DataRoot | None = None) -> DataRoot:
    """``data_root`` if given, else ``$DABENCH_DATA``, else :func:`default_data_root`."""
    if isinstance(data_root, DataRoot):
        return data_root
    if data_root not in (None, ""):
        return DataRoot(Path(data_root).expanduser().resolve(), "--data-root")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return DataRoot(Path(env).expanduser().resolve(), ENV_VAR)
    return DataRoot(default_data_root().expanduser().resolve(), "default")


def dataset_dir(name: str, data_root: str | os.PathLike | DataRoot | None = None) -> Path:
    return resolve_data_root(data_root).path / name


# --------------------------------------------------------------------------
# hashing, pins, format checks
# --------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    return _hashes(Path(path), md5=False)[0]


def _hashes(path: Path, md5: bool) -> tuple[str, str | None]:
    h = hashlib.sha256()
    m = hashlib.md5(usedforsecurity=False) if md5 else None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            if m is not None:
                m.update(chunk)
    return h.hexdigest(), (m.hexdigest() if m is not None else None)


def read_pins(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` from ``folder/SHA256SUMS`` (sha256sum format; ``#`` comments)."""
    p = folder / PINS_FILE
    pins: dict[str, str] = {}
    if not p.is_file():
        return pins
    for raw in p.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) == 2 and len(parts[0]) == 64:
            pins[parts[1].lstrip("*").strip()] = parts[0].lower()
    return pins


def _write_pin(folder: Path, name: str, sha: str) -> None:
    pins = read_pins(folder)
    if pins.get(name) == sha:
        return
    pins[name] = sha
    folder.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(folder / PINS_FILE)
    header = ("# sha256 of files without a published upstream hash, recorded by dabench on first download\n"
              "# (trust on first use) or written by you from a trusted source; `dabench data verify` checks them\n")
    tmp.write_text(header + "".join(f"{v}  {k}\n" for k, v in sorted(pins.items())), encoding="utf-8")
    os.replace(tmp, folder / PINS_FILE)
    log.info("pinned sha256 %s of %s in %s", sha, name, folder / PINS_FILE)


def _format_ok(path: Path, kind: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(128)
        if kind == "gzip":
            return head[:2] == b"\x1f\x8b"
        if kind == "bz2":
            return head[:3] == b"BZh"
        if kind == "mat":
            return head[:6] == b"MATLAB"
        if kind == "tar":
            return tarfile.is_tarfile(path)
        if kind == "zip":
            return zipfile.is_zipfile(path)
        return True
    except (OSError, tarfile.TarError, EOFError):
        return False


_KIND_NAMES = {"gzip": "gzip", "bz2": "bzip2", "mat": "MATLAB .mat", "tar": "tar", "zip": "zip"}


# --------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------


@dataclass
class FileStatus:
    """The state of one file after a check.

    ``state`` is ``"ok"`` (matches an upstream hash), ``"pinned"`` (matches
    the local pin: no upstream hash exists), ``"unverified"`` (present, no
    upstream hash and no pin yet), ``"missing"``, or ``"bad"`` (failed a hash
    or format check and was removed).
    """

    dataset: str
    file: RemoteFile
    path: Path
    state: str
    trust: str = ""
    sha256: str | None = None
    message: str = ""

    @property
    def usable(self) -> bool:
        return self.state in ("ok", "pinned", "unverified")


def _trust(f: RemoteFile) -> str:
    if f.sha256:
        return f"sha256 from {f.hash_source}"
    if f.md5:
        return f"md5 from {f.hash_source}"
    return ""


#: (path, size, mtime_ns) -> sha256 of files verified in this process
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _reject(path: Path, remove: bool) -> str:
    if remove:
        try:
            path.unlink()
            return "the file was removed so that it cannot be used"
        except OSError as exc:  # pragma: no cover - permissions
            return f"the file could not be removed ({exc}); delete it by hand"
    return "the file was not used"


def check_file(ds: Dataset, f: RemoteFile, root: DataRoot, *, remove_bad: bool = True,
               use_memo: bool = False) -> FileStatus:
    """Check one file against its upstream hash, its local pin, and its format."""
    folder = root.path / ds.name
    path = folder / f.name
    if not path.is_file():
        return FileStatus(ds.name, f, path, "missing", message=f"{f.name}: missing (looked for {path})")
    if use_memo:
        key = _stat_key(path)
        if key in _VERIFIED:
            pins = read_pins(folder)
            state = "ok" if (f.sha256 or f.md5) else ("pinned" if pins.get(f.name) else "unverified")
            return FileStatus(ds.name, f, path, state, _trust(f) or "local pin", _VERIFIED[key])
    if f.size is not None and path.stat().st_size != f.size:
        got_size = path.stat().st_size
        what = _reject(path, remove_bad)
        return FileStatus(ds.name, f, path, "bad", message=(
            f"{path}: size {got_size} bytes does not match the expected {f.size} bytes "
            f"(sha256 {f.sha256}, from {f.hash_source}); {what}"))
    sha, md5 = _hashes(path, md5=bool(f.md5) and not f.sha256)
    pins = read_pins(folder)
    pin = pins.get(f.name)
    if f.sha256:
        if sha != f.sha256:
            what = _reject(path, remove_bad)
            return FileStatus(ds.name, f, path, "bad", sha256=sha, message=(
                f"{path}: sha256 {sha} does not match the expected sha256 {f.sha256} "
                f"(from {f.hash_source}); {what}"))
        state, trust = "ok", _trust(f)
    elif f.md5:
        if md5 != f.md5:
            what = _reject(path, remove_bad)
            return FileStatus(ds.name, f, path, "bad", sha256=sha, message=(
                f"{path}: md5 {md5} does not match the expected md5 {f.md5} (from {f.hash_source}); {what}"))
        state, trust = "ok", _trust(f)
        if pin != sha:  # record the sha256 of the upstream-verified file (used by the feature cache key)
            _write_pin(folder, f.name, sha)
    elif pin:
        if sha != pin:
            what = _reject(path, remove_bad)
            return FileStatus(ds.name, f, path, "bad", sha256=sha, message=(
                f"{path}: sha256 {sha} does not match the expected sha256 {pin} pinned in "
                f"{folder / PINS_FILE} (no upstream hash is published for this file); {what}"))
        state, trust = "pinned", f"sha256 pinned locally in {folder / PINS_FILE} (no upstream hash published)"
    else:
        state, trust = "unverified", "UNVERIFIED: no upstream hash published and no local pin yet"
    if not _format_ok(path, f.kind):
        what = _reject(path, remove_bad)
        return FileStatus(ds.name, f, path, "bad", sha256=sha, message=(
            f"{path}: not a valid {_KIND_NAMES.get(f.kind, f.kind)} file (an error page saved in its "
            f"place?); {what}"))
    _VERIFIED[_stat_key(path)] = sha
    return FileStatus(ds.name, f, path, state, trust, sha)


def _missing_error(ds: Dataset, missing: list[RemoteFile], root: DataRoot, why: str = "") -> DataError:
    folder = root.path / ds.name
    names = ", ".join(f.name for f in missing)
    head = (f"dataset {ds.name!r}: {len(missing)} of {len(ds.files)} file(s) missing: {names}; "
            f"looked for them in {folder} ({root.describe()})")
    if why:
        head += f"; {why}"
    if any(not file_urls(ds, f) for f in missing) and ds.manual:
        steps = " ".join(f"({i}) {s.format(dir=folder, command=root.command(ds.name))}"
                         for i, s in enumerate(ds.manual, 1))
        return DataError(f"{head}. {ds.title} cannot be downloaded by dabench; manual steps: {steps}")
    return DataError(f"{head}. Run `{root.command(ds.name)}` to download and verify it")


def verify(name: str, data_root: str | os.PathLike | DataRoot | None = None,
           remove_bad: bool = True) -> list[FileStatus]:
    """Check every file of dataset ``name``; return one :class:`FileStatus` per file.

    Raises :class:`DataError` when a file is missing or failed its check (a
    failed file is removed); files without any hash are returned as
    ``"unverified"``, never as verified.
    """
    ds = get_dataset(name)
    root = resolve_data_root(data_root)
    statuses = [check_file(ds, f, root, remove_bad=remove_bad) for f in ds.files]
    bad = [s for s in statuses if s.state == "bad"]
    if bad:
        fix = (f"run `{root.command(ds.name)}` to fetch a good copy" if all(file_urls(ds, s.file) for s in bad)
               else "put a good copy back by the manual steps (`dabench data list` shows the homepage)")
        raise DataError(f"dataset {ds.name!r}: " + "; ".join(s.message for s in bad) + f"; {fix}")
    missing = [s.file for s in statuses if s.state == "missing"]
    if missing:
        # archives extracted earlier may have been deleted to save space: accept a marker
        really = [f for f in missing if not (f.extract and _marker(root.path / ds.name, f).is_file())]
        if really:
            raise _missing_error(ds, really, root)
        for s in statuses:
            if s.state == "missing":
                s.state, s.trust = "extracted", "archive deleted after extraction; marker kept"
                s.sha256 = _read_marker(root.path / ds.name, s.file).get("sha256")
    return statuses


# --------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------


def _pooch_hash(f: RemoteFile, pin: str | None) -> str | None:
    if f.sha256:
        return f"sha256:{f.sha256}"
    if f.md5:
        return f"md5:{f.md5}"
    if pin:
        return f"sha256:{pin}"
    return None


def _fetch(ds: Dataset, f: RemoteFile, root: DataRoot, progress: bool) -> FileStatus:
    try:
        import pooch
        import requests
    except ImportError as exc:
        raise DataError(f"downloading needs pooch ({exc}); run `pip install pooch`") from exc
    # pooch logs every download and, for files without a known hash, advice
    # meant for pooch users; dabench logs its own lines (and pins) instead
    pooch.get_logger().setLevel(logging.WARNING)
    folder = root.path / ds.name
    folder.mkdir(parents=True, exist_ok=True)
    pin = read_pins(folder).get(f.name)
    known = _pooch_hash(f, pin)
    progressbar = bool(progress)
    if progressbar:
        import importlib.util

        progressbar = importlib.util.find_spec("tqdm") is not None
    errors: list[str] = []
    for url in file_urls(ds, f):
        if known is None and url.lower().startswith("http://") and not http_allowed():
            errors.append(
                f"{url}: refused: plain http for a file with no published hash and no local pin (anyone on the "
                f"network path could swap it, and the copy would be pinned as genuine); use an https mirror, or "
                f"pin its sha256 from a trusted source in {folder / PINS_FILE} first, or accept the risk with "
                f"{ALLOW_HTTP_VAR}=1 (dabench data download --allow-http)")
            continue
        log.info("downloading %s from %s to %s", f.name, url, folder)
        try:
            pooch.retrieve(url, known_hash=known, fname=f.name, path=folder, progressbar=progressbar)
        except ValueError as exc:  # hash mismatch: pooch deleted the download
            expected = known.split(":", 1)[1] if known else "?"
            algo = known.split(":", 1)[0] if known else "sha256"
            source = f.hash_source or f"the local pin in {folder / PINS_FILE}"
            errors.append(f"{url}: the download's {algo} does not match the expected {algo} {expected} "
                          f"(from {source}); it was deleted and not used ({str(exc).splitlines()[0]})")
            continue
        except (requests.exceptions.RequestException, OSError) as exc:
            errors.append(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        st = check_file(ds, f, root)
        if st.state == "bad":
            errors.append(f"{url}: {st.message}")
            continue
        if st.state == "unverified":
            _write_pin(folder, f.name, st.sha256 or sha256_file(st.path))
            log.warning("%s has no published upstream hash; pinned its sha256 %s in %s (trust on first use)",
                        f.name, st.sha256, folder / PINS_FILE)
            st.state = "pinned"
            st.trust = f"sha256 pinned locally in {folder / PINS_FILE} on first download (no upstream hash published)"
        return st
    raise DataError(f"dataset {ds.name!r}: could not download {f.name}: " + "; ".join(errors))


def download(name: str, data_root: str | os.PathLike | DataRoot | None = None, *,
             progress: bool = False) -> list[FileStatus]:
    """Fetch (or, for manual datasets, take the file already put in place),
    verify, pin and extract every file of dataset ``name``.

    Files already present and passing their check are not downloaded again.
    Raises :class:`DataError` naming the file on any failure.
    """
    ds = get_dataset(name)
    root = resolve_data_root(data_root)
    folder = root.path / ds.name
    out: list[FileStatus] = []
    manual_missing: list[RemoteFile] = []
    for f in ds.files:
        st = check_file(ds, f, root)
        if st.state == "bad":
            log.warning("%s", st.message)
        if st.state in ("missing", "bad"):
            if not file_urls(ds, f):
                if st.state == "bad":
                    raise DataError(f"dataset {ds.name!r}: {st.message}; put a good copy back "
                                    f"(manual steps: `dabench data list`)")
                if f.extract and _marker(folder, f).is_file():
                    st.state, st.trust = "extracted", "archive deleted after extraction; marker kept"
                    out.append(st)
                    continue
                manual_missing.append(f)
                continue
            st = _fetch(ds, f, root, progress)
        elif st.state == "unverified":
            _write_pin(folder, f.name, st.sha256 or sha256_file(st.path))
            st.state = "pinned"
            st.trust = f"sha256 pinned locally in {folder / PINS_FILE} (no upstream hash published)"
        out.append(st)
    if manual_missing:
        raise _missing_error(ds, manual_missing, root)
    for st in out:
        if st.file.extract and st.state != "extracted":
            _extract(folder, st.file, st.path, st.sha256 or sha256_file(st.path))
    return out


# --------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------


def _bookkeeping(name: str) -> bool:
    """Names in a dataset folder that only dabench may write: the pins, the
    extraction markers and the temporary extraction folders."""
    return (name == PINS_FILE or name.startswith(f".{PINS_FILE}") or
            (name.startswith(".") and name.endswith(".extracted")) or name.startswith(".extract-"))


def _marker(folder: Path, f: RemoteFile) -> Path:
    return folder / f".{f.name}.extracted"


def _read_marker(folder: Path, f: RemoteFile) -> dict:
    try:
        return json.loads(_marker(folder, f).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _safe_zip_members(zf: zipfile.ZipFile, dest: Path) -> Iterable[zipfile.ZipInfo]:
    base = dest.resolve()
    for info in zf.infolist():
        target = (dest / info.filename).resolve()
        if info.filename.startswith(("/", "\\")) or not target.is_relative_to(base):
            raise DataError(f"refusing to extract {info.filename!r}: it would land outside {dest}")
        yield info


def _extract(folder: Path, f: RemoteFile, archive: Path, sha: str) -> None:
    marker = _marker(folder, f)
    if _read_marker(folder, f).get("sha256") == sha:
        return
    tmp = folder / f".extract-{f.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log.info("extracting %s into %s", archive, folder)
    try:
        if f.kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp, members=list(_safe_zip_members(zf, tmp)))
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{archive}: extraction failed ({type(exc).__name__}: {exc}); the archive may be "
                        f"truncated; delete it and download it again") from exc
    n = 0
    for entry in sorted(tmp.iterdir()):
        if _bookkeeping(entry.name):
            log.warning("%s: skipped the archive member %s: that name is dabench's own bookkeeping (pins, "
                        "extraction markers), which an archive may not write", archive, entry.name)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            continue
        dest = folder / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(entry, dest)
        n += 1
    tmp.rmdir()
    atomic_write_text(marker, json.dumps({"archive": f.name, "sha256": sha, "entries": n,
                                          "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


# --------------------------------------------------------------------------
# what loaders call
# --------------------------------------------------------------------------


def _find_file(ds: Dataset, filename: str) -> RemoteFile:
    for f in ds.files:
        if f.name == filename:
            return f
    raise KeyError(f"{ds.name} has no file {filename!r}")  # pragma: no cover - programming error


def require_file(dataset: str, filename: str, data_root: str | os.PathLike | DataRoot | None = None) -> Path:
    """The verified path of one file; DataError (missing / failed check) otherwise.

    Files are hashed once per process (memoised on path, size and mtime).
    """
    ds = get_dataset(dataset)
    root = resolve_data_root(data_root)
    f = _find_file(ds, filename)
    st = check_file(ds, f, root, use_memo=True)
    if st.state == "missing":
        # name every absent file of the dataset, not only the first one a loader asked for
        absent = [g for g in ds.files if g is f or not (root.path / ds.name / g.name).is_file()]
        raise _missing_error(ds, absent, root)
    if st.state == "bad":
        raise DataError(f"dataset {ds.name!r}: {st.message}; "
                        + (f"run `{root.command(ds.name)}` to fetch a good copy" if file_urls(ds, f)
                           else "put a good copy back by the manual steps (`dabench data list`)"))
    if st.state == "unverified":
        log.warning("%s: no upstream hash is published and no pin exists yet; run `%s` to pin it",
                    st.path, root.command(ds.name))
    return st.path


def require_extracted(dataset: str, filename: str, data_root: str | os.PathLike | DataRoot | None = None,
                      probe: str | None = None) -> Path:
    """The dataset folder once archive ``filename`` has been extracted there.

    Order: a marker from an earlier extraction (checked against the upstream
    hash or local pin); the archive itself (verified, then extracted); a
    folder matching the glob ``probe`` that the user extracted by hand (used
    with a warning: its integrity cannot be checked); else DataError.
    """
    ds = get_dataset(dataset)
    root = resolve_data_root(data_root)
    f = _find_file(ds, filename)
    folder = root.path / ds.name
    mk = _read_marker(folder, f)
    if mk:
        expected = f.sha256 or read_pins(folder).get(f.name)
        if expected and mk.get("sha256") != expected:
            raise DataError(f"dataset {ds.name!r}: {folder} holds files extracted from an archive with sha256 "
                            f"{mk.get('sha256')}, but {f.name} is expected to have sha256 {expected}; delete "
                            f"{_marker(folder, f)} and run `{root.command(ds.name)}`")
        return folder
    archive = folder / f.name
    if archive.is_file():
        st = check_file(ds, f, root, use_memo=True)
        if st.state == "bad":
            raise DataError(f"dataset {ds.name!r}: {st.message}; run `{root.command(ds.name)}`")
        if st.state == "unverified":
            _write_pin(folder, f.name, st.sha256 or sha256_file(archive))
        _extract(folder, f, archive, st.sha256 or sha256_file(archive))
        return folder
    if probe and folder.is_dir() and any(folder.glob(probe)):
        log.warning("%s: using files extracted by hand (no %s, no extraction marker): their integrity is "
                    "not verified", folder, f.name)
        return folder
    raise _missing_error(ds, [f], root)


def dataset_fingerprint(name: str, data_root: str | os.PathLike | DataRoot | None = None) -> str | None:
    """sha256 over the (file, sha256) list of dataset ``name``, from upstream
    hashes, local pins and extraction markers, without re-hashing files;
    None when some file's sha256 is not recorded (e.g. data extracted by hand)."""
    ds = get_dataset(name)
    root = resolve_data_root(data_root)
    folder = root.path / ds.name
    pins = read_pins(folder)
    parts = []
    for f in ds.files:
        sha = f.sha256 or pins.get(f.name) or (_read_marker(folder, f).get("sha256") if f.extract else None)
        if not sha:
            return None
        parts.append(f"{f.name}:{sha}")
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


@dataclass
class DatasetState:
    """Summary for `dabench data list`."""

    dataset: Dataset
    present: int
    total: int
    hashes: str
    folder: Path
    extra: dict = field(default_factory=dict)


def summarize(data_root: str | os.PathLike | DataRoot | None = None) -> list[DatasetState]:
    """Presence and hash provenance of every dataset, without hashing files."""
    root = resolve_data_root(data_root)
    out = []
    for ds in sorted(DATASETS.values(), key=lambda d: d.name):
        folder = root.path / ds.name
        pins = read_pins(folder)
        present = sum(1 for f in ds.files if (folder / f.name).is_file()
                      or (f.extract and _marker(folder, f).is_file()))
        n_up = sum(1 for f in ds.files if f.sha256 or f.md5)
        n_pin = sum(1 for f in ds.files if not (f.sha256 or f.md5) and f.name in pins)
        rest = len(ds.files) - n_up  # files without a published hash: pinned (sha256) on first download
        if n_up == len(ds.files):
            algos = {"sha256" if f.sha256 else "md5" for f in ds.files}
            hashes = f"upstream {'+'.join(sorted(algos))}"
        else:
            hashes = f"upstream for {n_up}/{len(ds.files)}" if n_up else "none upstream"
            if n_pin == rest:
                hashes += ", pinned here"
            elif n_pin:
                hashes += f", {n_pin}/{rest} pinned here, the rest on first download"
            else:
                hashes += ", pinned on first download"
        out.append(DatasetState(ds, present, len(ds.files), hashes, folder))
    return out
