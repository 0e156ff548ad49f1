"""Token sources: the running Python's standard library as bytes, the user's text files, or uint16 .bin memmaps."""

import sysconfig
import warnings
from pathlib import Path

import numpy as np

from lightning_smartmoe.errors import ConfigError

BYTE_VOCAB = 256
SNIFF_BYTES = 1 << 16
MAGIC = {b"\x93NUMPY": "a NumPy .npy array", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "gzip data",
         b"\x89PNG": "a PNG image", b"\x7fELF": "an executable", b"PAR1": "a Parquet file"}


class CorpusWarning(UserWarning):
    """A data file is read, but it does not look like what its name says."""


def looks_like(head: bytes) -> str | None:
    """None if `head` (a file's first bytes) looks like UTF-8 text, else what it looks like."""
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the sample
            zeros = head.count(0) / max(1, len(head))
            return f"binary data (not UTF-8 at byte {err.start}, {zeros:.0%} zero bytes)"
    if b"\x00" in head:
        return f"binary data ({head.count(0) / len(head):.0%} zero bytes)"
    return None


def _sniff(path: Path, as_tokens: bool) -> None:
    """Warn (CorpusWarning) when a file read as text is not text, or a .bin token file looks like text."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    what = looks_like(head)
    if as_tokens and what is None and head:
        warnings.warn(f"data.path: {path} looks like UTF-8 text, but is read as uint16 tokens (its name ends in .bin)",
                      CorpusWarning, stacklevel=3)
    elif not as_tokens and what is not None:
        warnings.warn(f"data.path: {path} is neither text nor a .bin token file: it looks like {what}; its bytes are "
                      "read as byte tokens (uint16 token files must end in .bin)", CorpusWarning, stacklevel=3)


def stdlib_files() -> list[Path]:
    """The .py files of the running Python's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def read_bytes(files: list[Path], check: bool = True) -> np.ndarray:
    """Concatenate the files' bytes into one uint8 token array (with `check`, warning about files that are not
    text)."""
    if check:
        for p in files:
            _sniff(p, as_tokens=False)
    return np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)


def read_bin(path: Path) -> np.ndarray:
    """Memory-map a headerless uint16 token file (nanoGPT's train.bin convention)."""
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"data.path: {path} is empty; a .bin token file needs at least one uint16 token")
    if size % 2:
        raise ConfigError(f"data.path: {path} has {size} bytes; a uint16 .bin token file must have an even length")
    _sniff(path, as_tokens=True)
    return np.memmap(path, dtype=np.uint16, mode="r")


def max_token(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """Largest token id, read in chunks so a large memmap is never loaded whole."""
    return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))


def load_splits(path: str | None, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation token arrays.

    Args:
        path: None for the standard-library corpus; a text file; a folder of text files (read
            recursively, in sorted order); a .bin file; or a folder with train.bin (nanoGPT's layout), and
            val.bin or not.
        val_fraction: share of tokens held out for validation (the tail) when no val.bin is given.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    if path is None:
        tokens = read_bytes(stdlib_files(), check=False)
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"data.path={path!r} does not exist; give a text file, a folder or a .bin file")
        if p.is_dir() and (p / "train.bin").is_file() and (p / "val.bin").is_file():
            return read_bin(p / "train.bin"), read_bin(p / "val.bin")
        if p.is_dir() and (p / "train.bin").is_file():
            tokens = read_bin(p / "train.bin")
        elif p.is_dir() and (p / "val.bin").is_file():
            raise ConfigError(f"data.path={path!r} has val.bin but no train.bin")
        elif p.suffix == ".bin":
            tokens = read_bin(p)
        else:
            tokens = read_bytes(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    if len(tokens) == 0:
        raise ConfigError(f"data.path={path!r}: the corpus is empty")
    split = int(len(tokens) * (1 - val_fraction))
    return tokens[:split], tokens[split:]
