"""Datasets as uint8 arrays in memory, or as a list of image files read per step.

Every reader returns images (N, H, W, C) uint8 and labels (N,) int64; load_dataset picks one
by --dataset name and adds the number of classes. An image folder can also be listed without
reading a pixel (`ImageFiles`, for large folders); `load_split` decides, from the run's config,
which form a run gets. Readers check what they read (structure,
label dtype and range against the class count) and name the file in a one-line UserError, so
bad data stops a run before any work instead of crashing fine-tuning or kNN later.

CIFAR-10/100 are read straight from their official pickles with a small reader that checks
structure (keys, shapes, dtypes), not md5: torchvision's CIFAR classes refuse any copy whose
checksums differ from the official release, so they are used only to download.
"""
import gzip
import math
import os
import pickle
import shutil
import stat
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from util.errors import UserError

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
FASHION_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = 10
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
# The report's code normalises with the widely copied (0.2023, 0.1994, 0.2010), 0.82x the data's
# true per-channel std (CIFAR10_DATA_STD, official MAE's choice: --norm_std 0.2470,0.2435,0.2616).
# Reproducing the report comes first, so its constant is the default.
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_DATA_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# Per-channel (mean, std) for normalisation; the one place dataset_stats reads. An image
# folder can hold anything, so it gets ImageNet's statistics, the usual default for photos.
STATS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "fashion_mnist": (FASHION_MEAN, FASHION_STD),
    "image_folder": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
}
IMAGE_SIZE = 32  # CIFAR's and (padded) Fashion-MNIST's side; image folders have any size
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "image_folder")  # --dataset: what load_dataset reads


@dataclass(frozen=True)
class CifarLayout:
    """Where one of the CIFAR releases keeps its pickles and what they hold."""
    title: str             # for messages
    folder: str            # what the official archive extracts to
    archive: str
    train: Tuple[str, ...]
    test: Tuple[str, ...]
    label_key: bytes       # CIFAR-100 also has b"coarse_labels" (20 superclasses); we use the fine ones
    num_classes: int
    torchvision_class: str  # used only to download


CIFAR = {
    "cifar10": CifarLayout("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           b"labels", 10, "CIFAR10"),
    "cifar100": CifarLayout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                            ("train",), ("test",), b"fine_labels", 100, "CIFAR100"),
}


# ---- checks shared by every reader ------------------------------------------------------------

def path_kind(path: str) -> Optional[str]:
    """"file", "dir" or None (nothing there); a path that cannot be looked at is a UserError.

    os.path.isfile/isdir answer False for "permission denied" or a file used as a folder, which
    made an unreadable data folder look absent (and sent it to the downloader): say the real cause.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        parts = os.path.abspath(path).split(os.sep)
        blocker = next((p for p in (os.sep.join(parts[:i]) for i in range(2, len(parts)))
                        if os.path.isfile(p)), None)
        raise UserError(f"{path}: {blocker or 'a part of it'} is a file, not a folder")
    except OSError as e:
        raise UserError(f"cannot access {path} ({e.strerror or type(e).__name__})")
    return "dir" if stat.S_ISDIR(mode) else "file"


def _kind_of_values(arr: np.ndarray) -> str:
    return {"S": "byte strings", "U": "strings", "f": "floats", "b": "booleans", "c": "complex numbers",
            "O": "Python objects"}.get(arr.dtype.kind, str(arr.dtype))


def check_labels(labels, num_classes: int, source: str) -> np.ndarray:
    """`labels` as (N,) int64 in 0..num_classes-1, or a UserError naming `source` and the bad value.

    Float labels would be truncated silently, byte strings crash inside numpy, and a label past
    the class count pretrains fine, then breaks fine-tuning and kNN (index out of bounds): all
    are refused here, when the file is read, before any work.
    """
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as e:  # a ragged or otherwise odd list
        raise UserError(f"{source}: labels are not a flat list of integers ({str(e).splitlines()[0]})")
    if labels.ndim != 1:
        raise UserError(f"{source}: labels have shape {labels.shape}, expected one integer per image")
    if len(labels) and labels.dtype.kind not in "iu":  # np.asarray([]) is float64: nothing to refuse
        raise UserError(f"{source}: labels are {_kind_of_values(labels)} (e.g. {labels[0]!r}), "
                        f"expected integers 0..{num_classes - 1}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes)) if len(labels) else []
    if len(bad):
        more = f"; {len(bad)} of {len(labels)} labels are" if len(bad) > 1 else ""
        raise UserError(f"{source}: label {labels[bad[0]]} (image {bad[0]}) is outside 0..{num_classes - 1}, "
                        f"the dataset has {num_classes} classes{more}")
    return labels.astype(np.int64)


# ---- CIFAR-10/100 pickles ---------------------------------------------------------------------

def _cifar_dir(spec: CifarLayout, root: str) -> str:
    """Accept either the parent folder or the extracted folder (e.g. cifar-10-batches-py) itself."""
    if os.path.basename(os.path.normpath(root)) == spec.folder:
        return root
    return os.path.join(root, spec.folder)


def _latin1(text: str, encoding: str) -> bytes:
    """_codecs.encode as pickle protocols 0-2 use it: bytes are stored as latin-1 text
    (`_codecs.encode(text, 'latin1')`); any other codec is refused, not looked up."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"holds a _codecs.encode call with encoding {encoding!r}")
    return text.encode("latin1")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what the official batches hold (numpy arrays, lists, bytes, numbers) and nothing
    else: any other global in a pickle could run code while loading, so a foreign file is refused.
    Batches re-pickled by Python 3 with protocol 0-2 build their bytes through _codecs.encode."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {
        (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | {
        (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"holds a {module}.{name} object")
        return super().find_class(module, name)


def _load_pickle(spec: CifarLayout, path: str):
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except OSError as e:  # permission denied, a read error
        raise UserError(f"{path}: cannot read it ({e.strerror or type(e).__name__})")
    except EOFError:
        raise UserError(f"{path}: not a readable {spec.title} batch (empty or truncated file)")
    except Exception as e:  # not a pickle, a foreign pickle, ...
        why = f"{type(e).__name__}: {e}" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        raise UserError(f"{path}: not a readable {spec.title} batch ({why})")


def _read_batch(spec: CifarLayout, path: str) -> Tuple[np.ndarray, np.ndarray]:
    """One pickle: images (N, 32, 32, 3) uint8 and labels (N,) int64, or a UserError naming it."""
    d = _load_pickle(spec, path)
    key = spec.label_key
    if not isinstance(d, dict) or b"data" not in d or key not in d:
        raise UserError(f"{path}: not a {spec.title} batch (expected keys b'data' and {key!r})")
    try:
        data = np.asarray(d[b"data"])
    except (ValueError, TypeError):  # a ragged list
        data = np.asarray(None)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: not a {spec.title} batch (data {data.dtype} {data.shape}; "
                        f"expected uint8 (N, 3072): N images of 32x32x3)")
    labels = check_labels(d[key], spec.num_classes, f"{path} ({key.decode()})")
    if len(labels) != len(data):
        raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
    # rows are CHW planes: R (1024), G, B
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar(name: str, root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 or CIFAR-100 (by `name`): images (N, 32, 32, 3) uint8 and labels (N,) int64."""
    spec = CIFAR[name]
    folder = _cifar_dir(spec, root)
    parts = [_read_batch(spec, os.path.join(folder, f)) for f in (spec.train if train else spec.test)]
    return (np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
            np.concatenate([p[1] for p in parts]))


def read_cifar10(root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Returns images (N, 32, 32, 3) uint8 and labels (N,) int64 in 0..9."""
    return read_cifar("cifar10", root, train)


def read_cifar100(root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Returns images (N, 32, 32, 3) uint8 and fine labels (N,) int64 in 0..99."""
    return read_cifar("cifar100", root, train)


def ensure_cifar(name: str, root: str, download: bool = True) -> None:
    """Make sure the CIFAR-10/100 pickles are at `root`, downloading the official archive if not."""
    spec = CIFAR[name]
    folder = _cifar_dir(spec, root)
    names = spec.train + spec.test
    if all(path_kind(os.path.join(folder, n)) == "file" for n in names):
        return
    if path_kind(root) == "file":
        raise UserError(f"data_path {root} is a file; pass the folder that holds {spec.folder}/")
    if path_kind(folder) == "dir":  # a partial or foreign copy: do not download over it
        missing = [n for n in names if path_kind(os.path.join(folder, n)) != "file"]
        raise UserError(f"{folder} is incomplete (missing {', '.join(missing)}); "
                        f"remove it to re-download or fix the copy")
    for other_name, other in CIFAR.items():  # e.g. --data_path .../cifar-100-python, --dataset cifar10
        if other is not spec and _cifar_dir(other, root) == root:
            raise UserError(f"{root} is the {other.title} folder, not {spec.title}: pass --dataset {other_name}")
    hint = (f"{spec.title} not found at {root} and could not be downloaded; put the extracted "
            f"{spec.archive} ({spec.folder}/) there or pass --data_path")
    if not download:
        raise UserError(hint)
    _download_cifar(spec, root, hint)


def _download_cifar(spec: CifarLayout, root: str, hint: str) -> None:
    """Download the archive into `root`; a failed attempt removes what it created, so a mistyped
    --data_path leaves no empty folders (nor a partial archive) behind."""
    created = None  # the topmost folder the attempt creates, when root does not exist yet
    if path_kind(root) is None:
        created = os.path.abspath(root)
        while path_kind(os.path.dirname(created)) is None:
            created = os.path.dirname(created)
    # only the names the download writes, and only if new: never anything that was there before
    ours = [created] if created else [os.path.join(root, n) for n in (spec.archive, spec.folder)
                                      if path_kind(os.path.join(root, n)) is None]
    try:
        import torchvision.datasets
        getattr(torchvision.datasets, spec.torchvision_class)(root, train=True, download=True)
    except BaseException as e:
        for path in ours:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        if not isinstance(e, Exception):  # Ctrl-C: cleaned up, still an interrupt
            raise
        typo = f"; {root} did not exist (a typo?)" if created else ""
        raise UserError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}){typo}")


# ---- Fashion-MNIST idx files ------------------------------------------------------------------

# type byte of the idx format -> what it holds; Fashion-MNIST's files are all uint8
_IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def _idx_bytes(root: str, name: str) -> Tuple[str, bytes]:
    """The path of `name` or `name.gz` in root and its (decompressed) bytes, or a UserError."""
    path = next((p for p in (os.path.join(root, name), os.path.join(root, name + ".gz"))
                 if path_kind(p) == "file"), None)
    if path is None:
        raise UserError(f"Fashion-MNIST file {name}[.gz] not found in {root} (Debian: apt-get install "
                        f"dataset-fashion-mnist, then --data_path /usr/share/datasets/fashion-mnist)")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            return path, f.read()
    except EOFError:  # the gzip stream stops before its end marker
        raise UserError(f"{path}: truncated gzip file (it ends early); copy it again")
    except (gzip.BadGzipFile, zlib.error) as e:  # bad magic, CRC or length, corrupt deflate data
        raise UserError(f"{path}: corrupt gzip file ({str(e).splitlines()[0]}); copy it again")
    except OSError as e:  # permission denied, a read error
        raise UserError(f"{path}: cannot read it ({e.strerror or type(e).__name__})")


def _read_idx(root: str, name: str, ndim: int) -> Tuple[str, np.ndarray]:
    """One file of the MNIST idx format (plain or .gz): magic 0x0000 TYPE NDIM, big-endian dims.

    Returns the path (for messages) and the uint8 array.
    """
    path, data = _idx_bytes(root, name)
    if len(data) < 4 or data[:2] != b"\0\0" or data[3] != ndim or data[2] not in _IDX_TYPES:
        raise UserError(f"{path}: not an idx file of uint8 with {ndim} dimensions"
                        + (" (empty file)" if not data else ""))
    if data[2] != 0x08:  # float labels would be truncated, wider ints need not fit: refuse both
        raise UserError(f"{path}: an idx file of {_IDX_TYPES[data[2]]} values, expected uint8")
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = header + math.prod(dims)  # Python ints: the dims of a bad header cannot overflow
    if len(data) < size:
        raise UserError(f"{path}: truncated idx file ({len(data)} bytes, its header says {size})")
    if len(data) > size:
        raise UserError(f"{path}: {len(data) - size} bytes after the data its header announces "
                        f"({'x'.join(map(str, dims))}); not a single idx file")
    return path, np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_fashion_mnist(root: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Returns images (N, 32, 32, 1) uint8 and labels (N,) int64.

    The 28x28 images are zero-padded (2 pixels a side, the background is black) to 32x32 so
    the 4x4-patch models see an 8x8 grid; grayscale stays one channel (models get in_chans=1).
    """
    image_path, images = _read_idx(root, FASHION_FILES[train][0], 3)
    label_path, labels = _read_idx(root, FASHION_FILES[train][1], 1)
    if images.shape[1:] != (28, 28):  # padding anything else would not give 32x32
        raise UserError(f"{image_path}: images of {images.shape[1]}x{images.shape[2]}, Fashion-MNIST's are 28x28")
    labels = check_labels(labels, FASHION_CLASSES, label_path)
    if len(images) != len(labels):
        raise UserError(f"{len(images)} images in {image_path} but {len(labels)} labels in {label_path}")
    return np.ascontiguousarray(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]), labels


# ---- image folder: DATA_PATH/{train,val}/CLASS/IMAGE --------------------------------------------

_LAYOUT = "expected DATA_PATH/train/CLASS/IMAGE and DATA_PATH/val/CLASS/IMAGE (or test/)"


def _class_folders(split: str) -> List[str]:
    """The sorted class folder names of a split (as torchvision's ImageFolder orders them), hidden
    ones left out: Jupyter's .ipynb_checkpoints is no class."""
    try:
        with os.scandir(split) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError as e:  # permission denied: not the same as "no class folders"
        raise UserError(f"cannot read {split} ({e.strerror or type(e).__name__})")
    if not classes:
        raise UserError(f"{split}: no class folders, hence no images ({_LAYOUT})")
    return classes


def _few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")


def image_folder_layout(root: str) -> Tuple[List[str], str, str]:
    """The class names (label i is classes[i]) and the train and val split folders of `root`.

    Both splits are checked on every load, so a bad val split fails before pretraining rather
    than at the first kNN evaluation.
    """
    if path_kind(root) != "dir":
        raise UserError(f"data_path {root} is not a folder ({_LAYOUT})")
    train = os.path.join(root, "train")
    if path_kind(train) != "dir":
        raise UserError(f"{root} has no train/ folder ({_LAYOUT})")
    val = next((p for p in (os.path.join(root, "val"), os.path.join(root, "test")) if path_kind(p) == "dir"), None)
    if val is None:
        raise UserError(f"{root} has neither a val/ nor a test/ folder ({_LAYOUT})")
    classes, val_classes = _class_folders(train), _class_folders(val)
    if classes != val_classes:  # else label i would mean different classes in the two splits
        diff = [f"only in {os.path.basename(split)}/: {_few(only)}" for split, only in
                ((train, set(classes) - set(val_classes)), (val, set(val_classes) - set(classes))) if only]
        raise UserError(f"{train} and {val} hold different class folders ({'; '.join(diff)})")
    return classes, train, val


class ImageFiles:
    """The image files of a split, where the other readers give a uint8 array: decoded per step at
    their own resolution by dataio.loader.FileLoader (image_folder, --data_loader torchvision).

    The N paths are one numpy bytes array, not a list of str: DataLoader workers share the
    parent's memory copy-on-write, and merely reading a list's str objects writes their
    refcounts, copying the pages into every worker (GBs for ImageNet's 1.28M paths).
    """
    channels = 3  # open_rgb converts every file to RGB

    def __init__(self, paths):
        self.paths = paths if isinstance(paths, np.ndarray) else np.array([os.fsencode(p) for p in paths])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        """A path (int i), or the ImageFiles of a slice."""
        return ImageFiles(self.paths[i]) if isinstance(i, slice) else os.fsdecode(self.paths[i])


def image_channels(images) -> int:
    """Channels of a split's images: a (N, H, W, C) array's C, or 3 for ImageFiles (RGB)."""
    return images.channels if isinstance(images, ImageFiles) else images.shape[3]


def _shown(path: str) -> str:
    """A path as text that prints anywhere: bytes of a non-UTF-8 name as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _dir_id(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ancestors(path: str) -> List[str]:
    """`path` and every folder above it, up to /."""
    out = [path]
    while os.path.dirname(out[-1]) != out[-1]:
        out.append(os.path.dirname(out[-1]))
    return out


# what a class folder's walk leaves out (not hidden names: those are never data), for the one-line note
_SKIPPED = {"special": "special file{s} (FIFO, socket or device: opening one can block forever)",
            "broken": "broken link{s}",
            "loop": "folder link{s} back into the class (a loop such as `x -> ..`) or to a folder already read"}


def _class_images(folder: str, skipped: Dict[str, List[str]]) -> List[str]:
    """The image files under a class folder and its subfolders, in torchvision's make_dataset
    order (folder path, then name), each read once.

    Real subfolders are read before folder links, and a link is followed only to a folder not yet
    read and not above the class folder: a loop (`loop -> ..`) would list the class again and
    again. Hidden names (macOS's ._x.png, .DS_Store) are left out; so are special files, never
    opened, and broken links, both listed in `skipped` by reason.
    """
    seen = {_dir_id(p) for start in {os.path.abspath(folder), os.path.realpath(folder)}
            for p in _ancestors(os.path.dirname(start))}
    found, real, links = [], [folder], []
    while real or links:
        path = real.pop() if real else links.pop(0)
        try:
            key = _dir_id(path)
            if key in seen:
                skipped["loop"].append(path)
                continue
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:  # an unreadable subfolder would silently shrink the class
            raise UserError(f"cannot read {_shown(path)} ({e.strerror or type(e).__name__})")
        seen.add(key)
        files = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                (links if e.is_symlink() else real).append(e.path)
            elif not has_file_allowed_extension(e.name, IMG_EXTENSIONS):
                continue
            elif e.is_file():  # a regular file, or a link to one
                files.append(e.path)
            else:
                skipped["special" if os.path.exists(e.path) else "broken"].append(e.path)
        found.append((path, files))
    return [f for _, files in sorted(found) for f in files]


_NOTED = set()  # notes already printed: every load of a split lists it again


def _note(line: str) -> None:
    if line not in _NOTED:
        _NOTED.add(line)
        print(f"note: {line}")


def image_folder_files(root: str, train: bool) -> Tuple[ImageFiles, np.ndarray, int]:
    """The files of root/train or root/val (no pixel read): ImageFiles, labels (N,) int64 and
    the number of classes (from the folders: a class may lack images in one split)."""
    classes, train_dir, val_dir = image_folder_layout(root)
    split = train_dir if train else val_dir
    skipped, paths, labels, empty = defaultdict(list), [], [], []
    for label, c in enumerate(classes):
        files = _class_images(os.path.join(split, c), skipped)
        paths += files
        labels += [label] * len(files)
        if not files:
            empty.append(c)
    for reason, found in skipped.items():
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        what = _SKIPPED[reason].format(s="s" if len(found) > 1 else "")
        _note(f"{split}: skipped {len(found)} {what}: {_shown(found[0])}{more}")
    if not paths:  # a class with no images in one split is legal; a split with none at all is not
        raise UserError(f"{split}: no images ({' '.join(IMG_EXTENSIONS)}) in its class folders")
    if empty:
        _note(f"{split}: no images in class folder(s) {_shown(_few(empty))}")
    return ImageFiles(paths), np.array(labels, np.int64), len(classes)


def _as_8_bits(img: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG, TIFF: I;16*, PGM: I) as 8-bit L, keeping the high byte as PIL does
    for 16-bit RGB; PIL's own conversion clips at 255, turning almost every pixel white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img).clip(0, 65535) >> 8).astype(np.uint8))
    return img


def open_rgb(path: str) -> Image.Image:
    """One image file, decoded, upright (EXIF orientation applied, as viewers show photos), as RGB
    from any PIL mode (L, P, RGBA, CMYK, 16-bit, ...; alpha dropped as torchvision's loader does)."""
    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)  # decodes now, inside the try: truncated files fail here
            return _as_8_bits(img).convert("RGB")
    except Exception as e:
        raise UserError(f"{_shown(path)}: not a readable image ({_why_unreadable(path, e)})")


def _why_unreadable(path: str, e: Exception) -> str:
    """What a user can act on: an empty or truncated file (a broken copy), else PIL's error type."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except OSError:
        pass
    return "truncated file" if str(e).startswith("image file is truncated") else type(e).__name__


def read_image_folder(root: str, train: bool, size: int = IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """Returns images (N, size, size, 3) uint8 and labels (N,) int64 from root/train or root/val.

    Each image keeps its central square, shorter side resized to `size` (bicubic; an image
    already size x size is read back exactly). All files are decoded once, here, so training
    sees in-memory arrays as for CIFAR.
    """
    files, labels, _ = image_folder_files(root, train)
    fit = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(size)])
    images = np.empty((len(files), size, size, 3), np.uint8)  # filled in place: no second copy

    def load(i: int) -> None:
        images[i] = np.asarray(fit(open_rgb(files[i])))
    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(load, range(len(files))))
    return images, labels


# ---- will an in-memory set fit? ---------------------------------------------------------------

# The uint8 set may take this share of the free memory: the in-memory loader copies it once more
# (NCHW layout) and the model, optimizer and batches need the rest.
MEMORY_SHARE = 0.5


def free_memory(device: torch.device) -> Dict[str, int]:
    """Bytes free now: {"RAM": ...}, plus the CUDA device's memory when the run uses one."""
    try:
        import psutil
        free = {"RAM": psutil.virtual_memory().available}
    except ImportError:
        free = {"RAM": _meminfo_available()}
    if device.type == "cuda":
        free[f"{device.type} device memory"] = torch.cuda.mem_get_info(device)[0]  # "cuda": the current one
    return free


def _meminfo_available() -> int:
    """Linux's MemAvailable (free + reclaimable caches); elsewhere the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_in_memory_fits(cfg) -> None:
    """Refuse --data_loader in_memory for an image folder too large for memory, from the file
    counts alone (no pixel read): train (cut to --train_subset) + val at input_size^2 x 3 bytes
    each, on the host once per process of this machine (torchrun) and on the CUDA device."""
    from util.runtime import resolve_device
    n_train, n_val = (len(image_folder_files(cfg.data_path, train)[0]) for train in (True, False))
    n = min(n_train, cfg.train_subset or n_train) + n_val
    size = n * cfg.input_size ** 2 * 3
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes of this machine, one copy each
    for where, free in free_memory(resolve_device(cfg.device)).items():
        need = size * (local if where == "RAM" else 1)
        if need > MEMORY_SHARE * free:
            copies = f" x {local} processes" if need != size else ""
            raise UserError(f"--data_loader in_memory would hold {n:,} images (train + val) of {cfg.input_size}x"
                            f"{cfg.input_size}x3 = {_bytes(size)} as uint8{copies}, more than half of the "
                            f"{_bytes(free)} of {where} free; pass --data_loader torchvision to read them "
                            f"from disk per step")


def _bytes(n: float) -> str:
    """442368 -> '442.4 kB', 2e11 -> '200.0 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


# ---- by name ----------------------------------------------------------------------------------

def load_dataset(name: str, root: str, train: bool, download: bool = True
                 ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Returns images (N, H, W, C) uint8, labels (N,) int64, number of classes."""
    if name in CIFAR:
        ensure_cifar(name, root, download)
        (images, labels), num_classes = read_cifar(name, root, train), CIFAR[name].num_classes
    elif name == "fashion_mnist":
        (images, labels), num_classes = read_fashion_mnist(root, train), FASHION_CLASSES
    elif name == "image_folder":
        # the class count comes from the folders, not the labels seen: a class may lack images
        (images, labels), num_classes = read_image_folder(root, train), len(image_folder_layout(root)[0])
    else:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(STATS)}")
    if len(images) == 0:
        raise UserError(f"{root}: the {name} files hold no images")
    return images, labels, num_classes


def load_split(cfg, train: bool) -> Tuple[Union[np.ndarray, ImageFiles], np.ndarray, int]:
    """One split of cfg.dataset as the run's loaders take it: images, labels (N,) int64, classes.

    images: CIFAR and Fashion-MNIST: (N, 32, 32, C) uint8, enlarged to --input_size by the
    loaders on the fly. image_folder: with --data_loader torchvision the ImageFiles, decoded per
    step at their own resolution; with in_memory (N, S, S, 3) uint8 at S = --input_size, each
    image's central square (refused before any pixel is read if it would not fit in memory).
    """
    if cfg.dataset == "image_folder" and cfg.data_loader != "in_memory":
        return image_folder_files(cfg.data_path, train)
    if cfg.dataset == "image_folder":
        if train:  # the val split is counted here too: the estimate covers both
            check_in_memory_fits(cfg)
        num_classes = len(image_folder_layout(cfg.data_path)[0])
        return (*read_image_folder(cfg.data_path, train, cfg.input_size), num_classes)
    if cfg.input_size < IMAGE_SIZE:  # the batched resampling has no antialiasing: it only enlarges
        raise UserError(f"--input_size {cfg.input_size}: {cfg.dataset} images are {IMAGE_SIZE}x{IMAGE_SIZE}; "
                        f"they can be enlarged to a larger input size, not shrunk")
    return load_dataset(cfg.dataset, cfg.data_path, train)


def load_train(cfg) -> Tuple[Union[np.ndarray, ImageFiles], np.ndarray, int]:
    """The training split (`load_split`), cut to its first cfg.train_subset images when that is set."""
    images, labels, num_classes = load_split(cfg, train=True)
    if cfg.train_subset:
        images, labels = images[:cfg.train_subset], labels[:cfg.train_subset]
    return images, labels, num_classes


def load_splits(cfg):
    """Train and test sets of cfg.dataset (`load_split`): (train_x, train_y, test_x, test_y, num_classes)."""
    from util.distributed import world
    train_x, train_y, num_classes = load_train(cfg)
    test_x, test_y, _ = load_split(cfg, train=False)
    if len(train_x) < cfg.batch_size * world():
        raise UserError(f"batch_size {cfg.batch_size} x {world()} ranks is larger than the dataset "
                        f"({len(train_x)} images)")
    return train_x, train_y, test_x, test_y, num_classes


def stats_text(values: Sequence[float]) -> str:
    """(0.2023, 0.1994, 0.201) -> '0.2023,0.1994,0.201', the form --norm_mean/--norm_std take."""
    return ",".join(f"{v:g}" for v in values)


def normalization(cfg) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) a run normalises with: cfg.norm_mean / cfg.norm_std where given
    (comma-separated, one value per channel), else the dataset's. Raises UserError if malformed."""
    mean, std = dataset_stats(cfg.dataset)
    return (_channel_values("norm_mean", cfg.norm_mean, len(mean), cfg.dataset) or mean,
            _channel_values("norm_std", cfg.norm_std, len(std), cfg.dataset, positive=True) or std)


def _channel_values(flag: str, text: str, channels: int, dataset: str, positive: bool = False):
    """'0.2,0.3,0.4' -> (0.2, 0.3, 0.4), checked: `channels` finite values (> 0 if positive)."""
    if not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected {channels} comma-separated numbers")
    if len(values) != channels:
        raise UserError(f"{flag} {text!r}: {dataset} images have {channels} channel(s), got {len(values)} values")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        raise UserError(f"{flag} {text!r}: values must be finite{' and > 0' if positive else ''}")
    return values


def dataset_stats(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std used for normalisation: C values each, C = the images' channels."""
    if name not in STATS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(STATS)}")
    return STATS[name]
