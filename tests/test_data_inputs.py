"""Image folders and CIFAR batches as other tools write them (issue 26): 16-bit and other PIL
modes, EXIF rotation, symlink loops, FIFOs, broken links, macOS and Jupyter leftovers, empty
classes, non-UTF-8 names, damaged files, CIFAR batches re-pickled by Python 3."""
import os
import pickle
import threading

import numpy as np
import pytest
from PIL import Image

from dataio.datasets import image_folder_files, open_rgb, read_cifar10, read_image_folder
from dataio.fake import write_fake_cifar10, write_fake_image_folder
from util.errors import UserError

RAMP = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472


def _folder(tmp_path, n=2):
    """ROOT/{train,val}/{bird,cat,ship}/NNNN.png, n 32x32 RGB PNGs each; returns ROOT."""
    return write_fake_image_folder(str(tmp_path / "data"), n_per_class=n)


def _counts(root, train=True):
    return np.bincount(image_folder_files(root, train)[1], minlength=3).tolist()


# ---- pixel formats ----------------------------------------------------------------------------

def _save_16(path, mode):
    """RAMP as a 16-bit grayscale file that PIL opens in `mode`."""
    if mode == "I;16B":  # big-endian TIFF, as some scanners and microscopes write
        Image.frombytes(mode, (32, 32), RAMP.astype(">u2").tobytes()).save(path)
    else:
        Image.fromarray(RAMP).save(path)  # PNG opens as I;16, 16-bit PGM as I


@pytest.mark.parametrize("name,mode", [("g.png", "I;16"), ("g.tif", "I;16B"), ("g.pgm", "I")])
def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, name, mode):
    """PIL's own conversion clips 16-bit values at 255: the ramp came back almost all white."""
    root = _folder(tmp_path, n=0)
    path = os.path.join(root, "train", "cat", name)
    _save_16(path, mode)
    assert Image.open(path).mode == mode
    x, _ = read_image_folder(root, train=True)
    want = (RAMP >> 8).astype(np.uint8)  # 0 .. 255, each value on 4 pixels
    assert all(np.array_equal(x[0, ..., c], want) for c in range(3))


def _palette_with_transparency():
    img = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (32, 8)), "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    img.info["transparency"] = 0  # index 0 transparent: its colour is kept, as torchvision keeps it
    return img, np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)[np.tile(np.arange(4), (32, 8))]


def _mode_cases():
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    grey3 = np.repeat(gray[..., None], 3, -1)
    bits = (np.indices((32, 32)).sum(0) % 2).astype(bool)
    cyan = np.zeros((32, 32, 4), np.uint8)
    cyan[:16, :, 0] = 255  # the top half cyan (C = 255), the rest white
    want_cyan = np.full((32, 32, 3), 255, np.uint8)
    want_cyan[:16, :, 0] = 0
    rgba = np.dstack([grey3, 255 - gray])
    return {
        "P+transparency.png": _palette_with_transparency(),
        "LA.png": (Image.fromarray(np.dstack([gray, 255 - gray]), "LA"), grey3),
        "RGBA.png": (Image.fromarray(rgba, "RGBA"), grey3),  # alpha dropped, the colours kept
        "CMYK.tif": (Image.fromarray(cyan, "CMYK"), want_cyan),
        "1-bit.png": (Image.fromarray(bits), np.repeat(bits[..., None] * np.uint8(255), 3, -1)),
    }


@pytest.mark.parametrize("name", list(_mode_cases()))
def test_other_modes_load_as_rgb(tmp_path, name):
    img, want = _mode_cases()[name]
    root = _folder(tmp_path, n=0)
    img.save(os.path.join(root, "train", "cat", name))
    x, _ = read_image_folder(root, train=True)
    assert np.array_equal(x[0], want)


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    """A phone's portrait photo: stored 48x32 (left half black) with Orientation 6, shown 32x48
    with the black half on top."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, 24:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = str(tmp_path / "portrait.jpg")
    Image.fromarray(stored).save(path, exif=exif)
    img = np.asarray(open_rgb(path))
    assert img.shape == (48, 32, 3) and img[:20].mean() < 30 and img[28:].mean() > 225


@pytest.mark.parametrize("damage,why", [
    (lambda data: b"", "empty file"),
    (lambda data: data[:len(data) // 2], "truncated file"),
])
def test_empty_or_truncated_image_is_one_line_naming_it(tmp_path, damage, why):
    root = _folder(tmp_path)
    bad = os.path.join(root, "train", "cat", "0001.png")
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(damage(data))
    with pytest.raises(UserError) as e:
        read_image_folder(root, train=True)
    assert str(e.value) == f"{bad}: not a readable image ({why})"


# ---- what a folder holds besides images -------------------------------------------------------

def _finishes(fn, unblock=lambda: None, seconds=60):
    """fn() run in a thread: its result, or a test failure (after `unblock()`) when it takes over
    `seconds`, so a regression to a hang (a FIFO waits for a writer, links loop) fails instead."""
    result = []

    def run():
        try:
            result.append(fn())
        except BaseException as e:  # raised here, in the test's thread
            result.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        pytest.fail(f"still running after {seconds} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def test_symlink_loops_list_each_image_once(tmp_path, capsys):
    """cat/loop -> .. used to walk train/ (cat included) over and over: 40x the cat images. A link
    to a folder not read elsewhere is still followed; a linked file is an image like any other."""
    root = _folder(tmp_path)
    cat, ship = os.path.join(root, "train", "cat"), os.path.join(root, "train", "ship")
    os.symlink("..", os.path.join(cat, "loop"))
    os.symlink(".", os.path.join(cat, "self"))
    os.makedirs(os.path.join(cat, "sub"))
    Image.open(os.path.join(cat, "0000.png")).save(os.path.join(cat, "sub", "more.png"))
    os.symlink("sub", os.path.join(cat, "again"))  # the same folder through a second name
    os.symlink("../../..", os.path.join(root, "train", "bird", "up"))  # above the data: every split
    elsewhere = tmp_path / "extra_ships"
    write_fake_image_folder(str(elsewhere), n_per_class=3, classes=("ship",))
    os.symlink(elsewhere / "train" / "ship", os.path.join(ship, "extra"))
    os.symlink(os.path.join(cat, "0000.png"), os.path.join(ship, "linked.png"))
    # bird, cat (+ sub/more.png), ship (+ extra/ + linked); the old walk followed each loop 40 links
    # deep, and with four loops it never ended
    assert _finishes(lambda: _counts(root)) == [2, 3, 2 + 3 + 1]
    files = image_folder_files(root, train=True)[0]
    assert os.path.join(cat, "sub", "more.png") in [files[i] for i in range(len(files))]  # its real path
    assert _counts(root) == [2, 3, 6]  # listed again: the note is not repeated
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"note: {root}/train: skipped 4 folder links back into the class")


def test_fifo_named_png_is_skipped_never_opened(tmp_path, capsys):
    root = _folder(tmp_path)
    fifo = os.path.join(root, "train", "cat", "stuck.png")
    os.mkfifo(fifo)
    x, y = _finishes(lambda: read_image_folder(root, train=True),
                     unblock=lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))  # the write end
    assert x.shape == (6, 32, 32, 3) and np.bincount(y).tolist() == [2, 2, 2]
    assert capsys.readouterr().out == (f"note: {root}/train: skipped 1 special file (FIFO, socket or device: "
                                       f"opening one can block forever): {fifo}\n")


def test_files_other_tools_leave_behind(tmp_path, capsys):
    """macOS's ._NAME and .DS_Store and Jupyter's .ipynb_checkpoints are never data (hidden names
    are left out without a word); a broken link is skipped with a note; upper-case extensions
    are images; a class folder with no images in a split is legal, with a note."""
    root = _folder(tmp_path)
    cat = os.path.join(root, "train", "cat")
    for junk in ("._0000.png", ".DS_Store"):
        with open(os.path.join(cat, junk), "wb") as f:
            f.write(b"\0\5\26\7 AppleDouble")
    for hidden in (os.path.join(root, "train", ".ipynb_checkpoints"), os.path.join(cat, ".ipynb_checkpoints")):
        os.makedirs(hidden)
        Image.open(os.path.join(cat, "0000.png")).save(os.path.join(hidden, "0000-checkpoint.png"))
    os.symlink("/nonexistent/0002.png", os.path.join(cat, "gone.png"))
    Image.open(os.path.join(cat, "0000.png")).save(os.path.join(cat, "UPPER.PNG"))
    with open(os.path.join(cat, "notes.txt"), "w") as f:
        f.write("not an image, not mentioned")
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split, "dog"))
    Image.open(os.path.join(cat, "0000.png")).save(os.path.join(root, "val", "dog", "0000.jpg"))
    x, y = read_image_folder(root, train=True)
    files, _, num_classes = image_folder_files(root, train=True)
    assert num_classes == 4 and np.bincount(y, minlength=4).tolist() == [2, 3, 0, 2]  # bird cat dog ship
    assert files[4] == os.path.join(cat, "UPPER.PNG") and np.array_equal(x[4], x[2])
    assert capsys.readouterr().out.splitlines() == [
        f"note: {root}/train: skipped 1 broken link: {cat}/gone.png",
        f"note: {root}/train: no images in class folder(s) dog"]
    assert np.bincount(image_folder_files(root, train=False)[1]).tolist() == [2, 2, 1, 2]


def test_non_utf8_file_names(tmp_path):
    """Names in another encoding (Latin-1 from an old archive) load, and a message naming one
    prints on any terminal: the byte as \\xe9."""
    root = _folder(tmp_path)
    cat = os.path.join(os.fsencode(root), b"train", b"cat")
    os.rename(os.path.join(cat, b"0000.png"), os.path.join(cat, b"caf\xe9.png"))
    x, y = read_image_folder(root, train=True)
    assert x.shape == (6, 32, 32, 3)
    bad = os.path.join(cat, b"z\xe9ro.png")
    open(bad, "wb").close()
    with pytest.raises(UserError) as e:
        read_image_folder(root, train=True)
    assert str(e.value).endswith("/train/cat/z\\xe9ro.png: not a readable image (empty file)")
    str(e.value).encode("utf-8")  # printable: no lone surrogates


# ---- CIFAR batches re-pickled by Python 3 ------------------------------------------------------

@pytest.mark.parametrize("protocol", [0, 2])
def test_cifar_batches_pickled_by_python3_with_old_protocols(tmp_path, protocol):
    """Protocols 0-2 store the arrays' bytes through _codecs.encode(text, 'latin1'); the
    restricted unpickler refused them as unsafe."""
    folder = write_fake_cifar10(str(tmp_path), per_batch=8, test_size=8)
    want = read_cifar10(str(tmp_path), train=True)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            d = pickle.load(f)
        d[b"data"], d[b"labels"] = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
        with open(path, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
    x, y = read_cifar10(str(tmp_path), train=True)
    assert np.array_equal(x, want[0]) and np.array_equal(y, want[1])


class _Calls:  # pickles as a call of fn(*args) when loaded
    def __init__(self, fn, *args):
        self.reduced = (fn, args)

    def __reduce__(self):
        return self.reduced


@pytest.mark.parametrize("payload,message", [
    (_Calls(os.system, "touch ran"), r"holds a posix.system object"),  # `ran` in the current folder
    (_Calls(__import__("_codecs").encode, "text", "rot13"), r"holds a _codecs.encode call with encoding 'rot13'"),
])
def test_other_globals_are_still_refused(tmp_path, monkeypatch, payload, message):
    monkeypatch.chdir(tmp_path)
    folder = write_fake_cifar10(str(tmp_path), per_batch=8, test_size=8)
    with open(os.path.join(folder, "data_batch_1"), "wb") as f:
        pickle.dump({b"data": payload, b"labels": []}, f, protocol=2)
    refused = rf"data_batch_1: not a readable CIFAR-10 batch \(UnpicklingError: {message}\)$"
    with pytest.raises(UserError, match=refused):
        read_cifar10(str(tmp_path), train=True)
    assert not (tmp_path / "ran").exists()  # refused before anything ran
