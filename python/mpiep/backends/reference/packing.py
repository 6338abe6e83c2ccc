"""Rows of several fields packed into one byte matrix, aligned by construction.

Every field starts at a multiple of ``ALIGN`` bytes inside a row and every row is a
multiple of ``ALIGN`` bytes long, so a typed view of any field of any row slice is
legal: ``storage_offset`` and the row stride are multiples of every element size
(issue 11, defect 1: a one-row receive once put an int64 field at byte offset 260).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALIGN = 16


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    width: int  # elements per row
    offset: int  # bytes from the row start, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


class RowLayout:
    """Byte layout of one packed row: ``[(name, dtype, elements per row), ...]``."""

    def __init__(self, fields: Sequence[tuple[str, torch.dtype, int]]) -> None:
        self.fields: dict[str, Field] = {}
        offset = 0
        for name, dtype, width in fields:
            field = Field(name, dtype, width, offset)
            self.fields[name] = field
            offset += _align(field.nbytes)
        self.row_bytes = offset

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """Typed ``[N, width]`` view of field ``name`` in a ``[N, row_bytes]`` uint8 matrix."""
        f = self.fields[name]
        return rows[:, f.offset : f.offset + f.nbytes].view(f.dtype)


def as_words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes viewed with the widest integer type that divides the last dimension:
    ``index_copy_`` moves int64 rows several times faster than uint8 or bf16 ones."""
    nbytes = t.shape[-1] * t.dtype.itemsize
    for dtype in (torch.int64, torch.int32, torch.int16):
        if nbytes % dtype.itemsize == 0 and t.dtype.itemsize <= dtype.itemsize:
            return t.view(torch.uint8).view(dtype) if t.dtype.itemsize == 1 else t.view(dtype)
    return t
