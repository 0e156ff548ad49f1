"""Token sources: the running Python's standard library as bytes, the user's text files, or uint16 .bin memmaps."""

import sysconfig
from pathlib import Path

import numpy as np

from lightning_smartmoe.errors import ConfigError

BYTE_VOCAB = 256


def stdlib_files() -> list[Path]:
    """The .py files of the running Python's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def read_bytes(files: list[Path]) -> np.ndarray:
    """Concatenate the files' bytes into one uint8 token array."""
    return np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)


def read_bin(path: Path) -> np.ndarray:
    """Memory-map a headerless uint16 token file (nanoGPT's train.bin convention)."""
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"data.path: {path} is empty; a .bin token file needs at least one uint16 token")
    if size % 2:
        raise ConfigError(f"data.path: {path} has {size} bytes; a uint16 .bin token file must have an even length")
    return np.memmap(path, dtype=np.uint16, mode="r")


def max_token(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """Largest token id, read in chunks so a large memmap is never loaded whole."""
    return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))


def load_splits(path: str | None, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation token arrays.

    Args:
        path: None for the standard-library corpus; a text file; a folder of text files (read
            recursively, in sorted order); a .bin file; or a folder with train.bin and val.bin.
        val_fraction: share of tokens held out for validation (the tail) when no val.bin is given.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    if path is None:
        tokens = read_bytes(stdlib_files())
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"data.path={path!r} does not exist; give a text file, a folder or a .bin file")
        if p.is_dir() and (p / "train.bin").is_file() and (p / "val.bin").is_file():
            return read_bin(p / "train.bin"), read_bin(p / "val.bin")
        if p.suffix == ".bin":
            tokens = read_bin(p)
        else:
            tokens = read_bytes(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    if len(tokens) == 0:
        raise ConfigError(f"data.path={path!r}: the corpus is empty")
    split = int(len(tokens) * (1 - val_fraction))
    return tokens[:split], tokens[split:]
