"""Corpora: nanoGPT folders with train.bin alone, and warnings for files that are not what their name says."""

import numpy as np
import pytest

from lightning_smartmoe import ConfigError
from lightning_smartmoe.data import load_splits
from lightning_smartmoe.data.corpus import CorpusWarning


def test_a_folder_with_train_bin_alone_is_uint16_tokens_with_a_validation_tail(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7
    tokens.tofile(tmp_path / "train.bin")
    train, val = load_splits(str(tmp_path), val_fraction=0.1)
    assert train.dtype == val.dtype == np.uint16
    assert np.array_equal(np.concatenate([train, val]), tokens) and len(val) == 100


def test_val_bin_without_train_bin_is_refused(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(ConfigError, match=r"has val\.bin but no train\.bin"):
        load_splits(str(tmp_path), val_fraction=0.1)


@pytest.mark.parametrize(
    "name,content,detected",
    [
        ("blob.dat", bytes(range(256)) * 8, r"binary data \(not UTF-8 at byte 128, 0% zero bytes\)"),
        ("tokens.u16", np.arange(300, dtype=np.uint16).tobytes(), r"binary data \(.*% zero bytes\)"),
        ("array.npy", b"\x93NUMPY\x01\x00" + bytes(100), r"a NumPy \.npy array"),
    ],
)
def test_a_file_that_is_neither_text_nor_tokens_is_read_with_a_warning(tmp_path, name, content, detected):
    (tmp_path / name).write_bytes(content)
    with pytest.warns(CorpusWarning, match=rf"is neither text nor a \.bin token file: it looks like {detected}"):
        train, val = load_splits(str(tmp_path / name), val_fraction=0.5)
    assert len(train) + len(val) == len(content)


def test_a_bin_file_that_looks_like_text_warns(tmp_path):
    (tmp_path / "corpus.bin").write_bytes(b"def main():\n    return 0\n" * 10)
    with pytest.warns(CorpusWarning, match=r"looks like UTF-8 text, but is read as uint16 tokens"):
        load_splits(str(tmp_path / "corpus.bin"), val_fraction=0.5)


def test_text_reads_without_a_warning(tmp_path, recwarn):
    (tmp_path / "a.py").write_text("print('héllo')\n" * 100)
    load_splits(str(tmp_path), val_fraction=0.5)
    assert not [w for w in recwarn if issubclass(w.category, CorpusWarning)]
