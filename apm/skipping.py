"""Training that survives bad image files.

An unreadable item (corrupt, truncated, not an image, too small, too large) is replaced by the next
readable one of the same dataset, so every batch keeps its size: data-parallel ranks then always
run the same number of equally sized steps (an empty batch on one rank would hang the others).
DataLoader workers are separate processes, so each failure travels back inside its batch; the
loader takes it out in the main process, warns once per file, and counts per pass.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, NamedTuple, Sequence

from torch.utils.data import DataLoader, Dataset, default_collate

from apm.errors import UnreadableImageError

log = logging.getLogger(__name__)


class Loaded(NamedTuple):
    """A dataset item plus the (name, reason) of every unreadable item skipped to reach it."""

    item: Any
    failures: tuple[tuple[str, str], ...]


def source_name(dataset: Dataset, i: int) -> str:
    """A printable name of item ``i`` (its file when the dataset has ``sources``)."""
    sources = getattr(dataset, "sources", None)
    return str(sources[i]) if sources is not None else f"item {i}"


def failure_reason(e: BaseException, name: str) -> str:
    """The reason of a failure, without repeating the file name the message may start with."""
    msg = str(e)
    if msg.startswith(name + ": "):
        msg = msg[len(name) + 2:]
    return msg if isinstance(e, UnreadableImageError) else f"{type(e).__name__}: {msg}"


def try_item(dataset: Dataset, i: int) -> tuple[bool, Any]:
    """``(True, item i)`` when it loads, else ``(False, (name, reason))``: one bad file must
    never end a long run, so any exception counts as unreadable."""
    try:
        return True, dataset[i]
    except Exception as e:
        name = source_name(dataset, i)
        return False, (name, failure_reason(e, name))


class SkipBadImages(Dataset):
    """Wrap a dataset so that an item that raises is replaced by the next readable one.

    Returns :class:`Loaded` pairs, for :func:`collate_skipping`. Raises UnreadableImageError only
    when no item of the dataset can be read.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Loaded:
        failures: list[tuple[str, str]] = []
        n = len(self.dataset)
        for k in range(n):
            ok, got = try_item(self.dataset, (i + k) % n)
            if ok:
                return Loaded(got, tuple(failures))
            failures.append(got)
        raise UnreadableImageError(
            f"None of the {n} images could be read: " + "; ".join(f"{a}: {b}" for a, b in failures[:5])
        )


def collate_skipping(samples: Sequence[Loaded]) -> tuple[Any, list[tuple[str, str]]]:
    """Collate :class:`Loaded` items: (the usual batch, the failures met while loading it)."""
    return default_collate([s.item for s in samples]), [f for s in samples for f in s.failures]


class SkipLog:
    """Failures seen in the main process: one warning per file, a count per pass."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.passes: dict[str, int] = {}

    def record(self, failures: Sequence[tuple[str, str]], seen: set[str] | None = None) -> None:
        """Warn about files not warned about before; add their names to ``seen``."""
        for name, reason in failures:
            if seen is not None:
                seen.add(name)
            if name not in self.reasons:
                self.reasons[name] = reason
                log.warning("skipped image %s: %s", name, reason)

    def end_pass(self, label: str, seen: set[str], total: int) -> None:
        """Report how many files one full pass over ``total`` items skipped."""
        self.passes[label] = self.passes.get(label, 0) + 1
        if seen:
            log.warning(
                "%s, pass %d: skipped %d unreadable image(s) of %d (named in the warnings above; "
                "each was replaced by the next readable image); %d distinct so far",
                label, self.passes[label], len(seen), total, len(self.reasons),
            )

    def summary(self, tail: str = "") -> None:
        """One closing line listing every skipped file (``tail`` appended)."""
        if self.reasons:
            names = list(self.reasons)
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            log.warning("%d image file(s) were skipped as unreadable: %s%s%s",
                        len(names), ", ".join(names[:10]), more, tail)


class SkippingDataLoader(DataLoader):
    """A DataLoader over :class:`SkipBadImages` that yields the usual batches and hands the
    failures travelling with them to ``skip_log`` (in the main process)."""

    def __init__(self, dataset: Dataset, *args: Any, skip_log: SkipLog | None = None,
                 label: str = "images", **kwargs: Any):
        kwargs.setdefault("collate_fn", collate_skipping)
        super().__init__(dataset, *args, **kwargs)
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.label = label

    def __iter__(self) -> Iterator[Any]:
        seen: set[str] = set()
        last = len(self) - 1
        for i, (batch, failures) in enumerate(super().__iter__()):
            if failures:
                self.skip_log.record(failures, seen)
            if i == last:  # before the yield: Lightning stops at the batch count, never asks again
                self.skip_log.end_pass(self.label, seen, len(self.dataset))
            yield batch


def readable_items(dataset: Dataset, n: int, skip_log: SkipLog | None = None) -> list[Any]:
    """The first ``n`` items of ``dataset`` that load, in order (fewer when fewer do). Each
    unreadable item met on the way is handed to ``skip_log`` (one warning per file)."""
    items, failures = [], []
    for i in range(len(dataset)):
        if len(items) == n:
            break
        ok, got = try_item(dataset, i)
        if ok:
            items.append(got)
        else:
            failures.append(got)
    (skip_log if skip_log is not None else SkipLog()).record(failures)
    return items


def first_readable(dataset: Dataset) -> tuple[int | None, list[tuple[str, str]]]:
    """Index of the first item that loads (None if none does) and the failures before it."""
    failures = []
    for i in range(len(dataset)):
        ok, got = try_item(dataset, i)
        if ok:
            return i, failures
        failures.append(got)
    return None, failures
