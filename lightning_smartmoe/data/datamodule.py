"""Next-token windows over a token array, and the LightningDataModule that serves them."""

import itertools
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_smartmoe.data.corpus import BYTE_VOCAB, load_splits, max_token
from lightning_smartmoe.errors import ConfigError


class TokenWindows(Dataset):
    """Item i is (x, y): [seq_len] int64 tokens and the same shifted by one.

    With `seed`, window starts are drawn uniformly once (deterministic per index); without, the
    windows tile the array back to back.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int | None = None) -> None:
        span = len(tokens) - seq_len - 1
        if span < 0:
            raise ConfigError(f"data: {len(tokens)} tokens cannot fill one window of model.seq_len={seq_len} + 1")
        self.tokens = tokens
        self.seq_len = seq_len
        count = max(1, len(tokens) // seq_len) if seed is not None else span // seq_len + 1
        if seed is None:
            self.starts = np.arange(count, dtype=np.int64) * seq_len
        else:
            self.starts = np.random.default_rng(seed).integers(0, span + 1, size=count)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[i])
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class ResumableSampler(DistributedSampler):
    """In-order DistributedSampler whose iteration starts `skip_batches()` batches in.

    Rank r of dp reads windows r, r + dp, ...: the ranks' i-th batches together are the single-process
    i-th global batch whatever the layout, so skipping k local batches skips k global batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, skip_batches: Callable[[], int], **kwargs) -> None:
        super().__init__(dataset, shuffle=False, drop_last=True, **kwargs)
        self.batch_size = batch_size
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip_batches() * self.batch_size, None)


class TokenDataModule(pl.LightningDataModule):
    """Language-model batches over `load_splits(path)`.

    `global_batch_size` sequences make one optimizer step; each rank's loader yields
    global_batch_size / (data-parallel size * accumulate_grad_batches) of them per micro-step.
    """

    def __init__(
        self,
        path: str | None = None,
        seq_len: int = 128,
        global_batch_size: int = 32,
        val_fraction: float = 0.05,
        vocab_size: int = BYTE_VOCAB,
        num_workers: int = 0,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if global_batch_size < 1:
            raise ConfigError(f"data.global_batch_size={global_batch_size} must be >= 1")
        self.path, self.seq_len, self.global_batch_size = path, seq_len, global_batch_size
        self.val_fraction, self.vocab_size = val_fraction, vocab_size
        self.num_workers, self.seed = num_workers, seed
        self.train: TokenWindows | None = None
        self.val: TokenWindows | None = None
        self.micro_batch_size = global_batch_size
        self.data_parallel_size = 1
        self._resumed_windows_per_batch: int | None = None  # of the run that wrote the checkpoint

    def size_batches(self, data_parallel_size: int, accumulate: int, microbatches: int = 1) -> None:
        """Size the per-rank batch (`microbatches`: pipeline micro-batches each batch is cut into). Raises
        ConfigError if the global batch does not divide."""
        if self.global_batch_size % (data_parallel_size * accumulate * microbatches):
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} must be divisible by data-parallel size "
                f"{data_parallel_size} x trainer.accumulate_grad_batches={accumulate} x parallel.microbatches={microbatches}"
            )
        self.micro_batch_size = self.global_batch_size // (data_parallel_size * accumulate)
        self.data_parallel_size = data_parallel_size

    def prepare(self, data_parallel_size: int, accumulate: int, microbatches: int = 1) -> None:
        """Size the per-rank batch, then load and check the corpus. Raises ConfigError on bad input."""
        self.size_batches(data_parallel_size, accumulate, microbatches)
        train, val = load_splits(self.path, self.val_fraction)
        top = max(max_token(train), max_token(val) if len(val) else 0)
        if top >= self.vocab_size:
            raise ConfigError(f"data.path holds token id {top}; model.vocab_size={self.vocab_size} must exceed it")
        self.train = TokenWindows(train, self.seq_len, seed=self.seed)
        self.val = TokenWindows(val, self.seq_len)

    def setup(self, stage: str) -> None:
        if self.train is None:
            strategy = self.trainer.strategy
            dp = strategy.distributed_sampler_kwargs["num_replicas"] if strategy.distributed_sampler_kwargs else 1
            self.prepare(dp, self.trainer.accumulate_grad_batches, getattr(strategy, "microbatches", 1))

    def train_dataloader(self) -> DataLoader:
        """In-order batches (Lightning's own sampler would shuffle), resuming mid-epoch where a checkpoint left off."""
        self._convert_resumed_position()
        kwargs = self.trainer.strategy.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
        sampler = ResumableSampler(self.train, self.micro_batch_size, self._batches_done_this_epoch, **kwargs)
        return DataLoader(
            self.train, batch_size=self.micro_batch_size, sampler=sampler, drop_last=True, num_workers=self.num_workers
        )

    @property
    def windows_per_batch(self) -> int:
        """Windows that one loader batch on every data-parallel rank consumes together."""
        return self.micro_batch_size * self.data_parallel_size

    def state_dict(self) -> dict[str, int]:
        return {"windows_per_batch": self.windows_per_batch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resumed_windows_per_batch = state_dict["windows_per_batch"]

    def _batches_done_this_epoch(self) -> int:
        """Batches of the current epoch already trained when resuming from a checkpoint, else 0."""
        loop = self.trainer.fit_loop
        return loop.epoch_loop.batch_progress.current.ready if loop.restarting else 0

    def _convert_resumed_position(self) -> None:
        """When resuming mid-epoch from a run that split the global batch differently (other dp or accumulation),
        count its progress in this run's batches: what counts is the windows it consumed. Lightning's batch
        counters of the epoch are rewritten once, before the epoch loop starts, so that accumulation cycles and
        the epoch end line up."""
        loop = self.trainer.fit_loop
        saved, now = self._resumed_windows_per_batch, self.windows_per_batch
        self._resumed_windows_per_batch = None
        if not loop.restarting or saved is None or saved == now:
            return
        progress = loop.epoch_loop.batch_progress
        windows = progress.current.ready * saved
        if windows % now or windows // now % self.trainer.accumulate_grad_batches:
            raise ConfigError(
                f"cannot resume mid-epoch: the checkpoint's run consumed {windows} windows this epoch, not a whole "
                f"number of this run's optimizer steps ({now} windows per batch x "
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}); was "
                "data.global_batch_size changed?"
            )
        shift = windows // now - progress.current.ready  # the other counters keep their distance to ready
        for tracker in (progress.current, progress.total):
            for field in ("ready", "started", "processed", "completed"):
                setattr(tracker, field, getattr(tracker, field) + shift)

    def val_dataloader(self) -> DataLoader:
        """Full batches only: a pipeline schedule needs every batch to have the training batch's shape."""
        return DataLoader(
            self.val, batch_size=self.micro_batch_size, shuffle=False, drop_last=True, num_workers=self.num_workers
        )
