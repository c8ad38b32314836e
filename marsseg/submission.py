"""Kaggle submission CSV: write it fast and atomically, read it back strictly.

The challenge scores a CSV that the course's helper produced with pandas (`pandas_reference_csv`
below): header `id,0,1,...,8191`, then one row per test image in `test_set` order, the id first and
the mask flattened in C order (column `r * 128 + c` holds pixel (r, c)), `\\n` line endings and a
final newline. On the 10022-image test set that pandas path formats 82 M cells one by one and takes
about 10 s (measured with pandas 3.1). Every label is a single ASCII digit, so
`write_submission` builds the same bytes with NumPy instead (each cell becomes the two bytes
`<digit>,`) in about 0.2 s, byte-identical to the reference on POSIX, where pandas' default line
terminator is `\\n`.

`read_submission` parses such a file back to masks and rejects anything the scorer might misread,
so a written submission can be checked before it is uploaded.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from marsseg.classes import IMAGE_HEIGHT, IMAGE_WIDTH, NUM_CLASSES
from marsseg.errors import DataError, first_line
from marsseg.fileio import naming

PIXELS = IMAGE_HEIGHT * IMAGE_WIDTH
"""Pixel columns per row: one per pixel of a flattened mask."""
MAX_LABEL = NUM_CLASSES - 1
# The encoder writes each label as exactly one ASCII digit and the reader parses fixed-width rows.
assert MAX_LABEL <= 9, "submission encoding assumes single-digit labels"

ROWS_PER_CHUNK = 1024
"""Rows encoded per write: bounds the text buffer to ~16 MiB whatever the number of test images."""
_ROW_TEXT_BYTES = 2 * PIXELS
"""Bytes of a row after its `id,` prefix: a digit and a comma per pixel, the last `,` a newline."""
_DIGIT_COMMA = ord("0") | (ord(",") << 8)
"""Added to a label as little-endian uint16, it gives the bytes `<digit>,` in one vectorised add."""
_O_BINARY = getattr(os, "O_BINARY", 0)
GZIP_MAGIC = b"\x1f\x8b"
"""Windows would otherwise translate bytes written through a raw descriptor; 0 elsewhere."""
_LABEL_BYTES = frozenset(str(label).encode() for label in range(MAX_LABEL + 1))


def _header() -> bytes:
    """The reference's header line, newline included: `id` then the pixel indices 0..8191."""
    return b",".join([b"id", *(str(i).encode() for i in range(PIXELS))]) + b"\n"


HEADER = _header()


def submission_bytes(n_images: int, compressed: bool = False) -> int:
    """A rough lower bound on a submission's size, for checking free space before predicting:
    two bytes per pixel (~16 MB per 1000 images), or 1/256 of that gzipped (measured: ~1/30)."""
    plain = n_images * _ROW_TEXT_BYTES + len(HEADER)
    return plain // 256 if compressed else plain


def pandas_reference_csv(preds: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write `preds` (M, 64, 128) with the course's own pandas helper, unchanged.

    This is the definition of the format that the challenge's scorer was built around. It is kept
    only to verify `write_submission` (tests and `benchmarks/submission.py` compare the bytes);
    it is slow and does no validation, so do not use it to produce submissions.
    """

    def y_to_df(y: np.ndarray) -> pd.DataFrame:
        n_samples = len(y)
        y_flat = y.reshape(n_samples, -1)
        df = pd.DataFrame(y_flat)
        df["id"] = np.arange(n_samples)
        cols = ["id"] + [col for col in df.columns if col != "id"]
        return df[cols]

    y_to_df(preds).to_csv(path, index=False)


def write_submission(pred_masks: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Validate predicted masks and write them as the challenge's submission CSV; return the path.

    `pred_masks` is an array (or array-like, e.g. a CPU tensor) of shape (M, 64, 128), M >= 1, in
    `test_set` order. Integer dtypes are accepted as they are; float dtypes only when every value
    is integral (argmax output cast to float is common and harmless, but a fractional value or a
    NaN means the caller passed scores or probabilities, not labels); bool and other dtypes are
    rejected. Labels must lie in 0..4. Each problem raises `DataError` with a one-line message,
    before anything touches the disk.

    The file is written to a temporary file beside `path` and moved over it with `os.replace`, so
    `path` never holds a partial file: on any failure, `KeyboardInterrupt` included, the temporary
    file is removed and a file already at `path` is left as it was. An existing file IS replaced
    on success: refusing to overwrite is the caller's policy (the CLI's `--force`), not this
    function's. The output always uses `\\n` line endings, byte-identical to
    `pandas_reference_csv` on POSIX (on Windows pandas would write `\\r\\n`). A path ending in
    `.gz` gets the same bytes gzip-compressed (the full test set shrinks from ~30 MB to ~1 MB,
    small enough to keep in git), with a zero timestamp so equal predictions give equal files.
    """
    masks = _validated_masks(pred_masks)
    target = Path(path)
    _write_atomically(target, _encoded_chunks(masks))
    return target


def _validated_masks(pred_masks: np.ndarray) -> np.ndarray:
    """Return the predictions as C-contiguous uint8, or raise `DataError` naming the problem."""
    try:
        masks = np.asarray(pred_masks)
    except (TypeError, ValueError) as err:
        raise DataError(f"predictions are not an array: {first_line(err)}") from err
    expected = f"(M, {IMAGE_HEIGHT}, {IMAGE_WIDTH})"
    if masks.ndim != 3 or masks.shape[1:] != (IMAGE_HEIGHT, IMAGE_WIDTH):
        raise DataError(f"predictions must have shape {expected}, got {masks.shape}")
    if masks.shape[0] == 0:
        raise DataError(f"predictions hold no masks: shape {masks.shape}, expected {expected}")
    kind = masks.dtype.kind
    if kind == "f":
        _check_integral(masks)
    elif kind not in "iu":
        raise DataError(
            f"predictions must hold integer labels 0..{MAX_LABEL}, got dtype {masks.dtype}"
        )
    if masks.min() < 0 or masks.max() > MAX_LABEL:
        raise DataError(_out_of_range_message(masks))
    return np.ascontiguousarray(masks, dtype=np.uint8)


def _check_integral(masks: np.ndarray) -> None:
    """Reject NaNs and fractional values in float predictions (infinities fail the range check)."""
    nans = int(np.count_nonzero(np.isnan(masks)))
    if nans:
        raise DataError(f"predictions hold NaN at {_pixels(nans)}; labels must be 0..{MAX_LABEL}")
    with np.errstate(invalid="ignore"):
        fractional = masks != np.trunc(masks)
    count = int(np.count_nonzero(fractional))
    if count:
        first = masks[fractional][0]
        raise DataError(
            f"predictions hold non-integral value {first} at {_pixels(count)}; "
            f"labels must be integers 0..{MAX_LABEL}"
        )


def _out_of_range_message(masks: np.ndarray) -> str:
    """Name each label outside 0..MAX_LABEL with its pixel count (the first few, if many)."""
    bad = masks[(masks < 0) | (masks > MAX_LABEL)]
    values, counts = np.unique(bad, return_counts=True)
    shown = [(_label_text(v), _pixels(int(c))) for v, c in zip(values, counts, strict=True)]
    if len(shown) == 1:
        (value, where), *_ = shown
        return f"predictions hold label {value} at {where}; labels must be 0..{MAX_LABEL}"
    listed = ", ".join(f"{value} at {where}" for value, where in shown[:4])
    more = f" and {len(shown) - 4} more" if len(shown) > 4 else ""
    return f"predictions hold labels outside 0..{MAX_LABEL}: {listed}{more}"


def _label_text(value: np.generic) -> str:
    """Print an integral float label as `7`, not `7.0`; infinities as `inf`/`-inf`."""
    number = value.item()
    return str(int(number)) if np.isfinite(number) else str(number)


def _pixels(count: int) -> str:
    return f"{count} pixel" if count == 1 else f"{count} pixels"


def _encoded_chunks(masks: np.ndarray) -> Iterable[bytes]:
    """Yield the file's bytes: the header, then rows in chunks of `ROWS_PER_CHUNK`.

    One uint16 buffer is reused for every chunk so memory stays bounded for any M.
    """
    yield HEADER
    rows = masks.reshape(len(masks), PIXELS)
    cells = np.empty((min(len(rows), ROWS_PER_CHUNK), PIXELS), dtype="<u2")
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        yield encode_rows(rows[start : start + ROWS_PER_CHUNK], start, cells)


def encode_rows(rows: np.ndarray, first_id: int, cells: np.ndarray) -> bytes:
    """Encode validated uint8 rows (k, 8192) as CSV lines with ids `first_id`, `first_id + 1`, ...

    Little-endian `label + _DIGIT_COMMA` is the byte pair `<digit>,`; viewing the uint16 buffer as
    bytes gives a row's text with a trailing comma, which becomes the newline.
    """
    k = len(rows)
    text = cells[:k]
    np.add(rows, _DIGIT_COMMA, out=text, dtype="<u2")
    text_bytes = text.view(np.uint8).reshape(k, _ROW_TEXT_BYTES)
    text_bytes[:, -1] = ord("\n")
    pieces: list[bytes | np.ndarray] = []
    for offset in range(k):
        pieces += (b"%d," % (first_id + offset), text_bytes[offset])
    return b"".join(pieces)


def _write_atomically(target: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to a fresh file beside `target`, then move it over `target` in one step.

    The temporary file sits in the same directory so that `os.replace` is an atomic rename on the
    same filesystem; `fsync` before the rename keeps a crash from leaving a renamed empty file. It
    is created exclusively with a random name, so it never clobbers another writer's temporary
    file, and with mode 0666 minus the umask like any new file (`mkstemp` would leave it 0600).
    """
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    with naming(target):  # a failure names the user's file, not the temporary one
        # Created before the `try`: if the name were somehow taken, that file is not ours.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
        try:
            with open(descriptor, "wb") as file:
                sink = _compressor(file) if target.suffix == ".gz" else contextlib.nullcontext(file)
                with sink as out:
                    for chunk in chunks:
                        out.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise


def _compressor(file: BinaryIO) -> gzip.GzipFile:
    """A gzip stream into `file` whose bytes depend on the content only (no name, no time)."""
    # Level 6 (zlib's default) packs label text as tightly as 9 within ~10%, several times faster.
    return gzip.GzipFile(filename="", mode="wb", fileobj=file, mtime=0, compresslevel=6)


def read_submission(path: str | os.PathLike[str], *, n_rows: int | None = None) -> np.ndarray:
    """Parse a submission CSV back to masks (M, 64, 128) uint8, checking it strictly.

    Checks the exact header, ids 0..M-1 in order, 8192 single-digit labels 0..4 per row, and M
    equal to `n_rows` when given (a missing final row can only be caught that way). Any mismatch
    raises `DataError` with one line naming the file, the line number and the problem. `\\r\\n`
    line endings and a missing final newline are accepted, since a scorer reads those alike.
    A gzip-compressed file (`submission.csv.gz`) is read as its content.
    Parsing is vectorised over fixed-width rows, so the full test set reads in about 0.3 s.
    """
    source = Path(path)
    data = source.read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DataError(f"{source}: not a readable gzip file ({err})") from None
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"

    def fail(problem: str, line: int | None = None) -> DataError:
        where = f"{source}: line {line}" if line is not None else str(source)
        return DataError(f"{where}: {problem}")

    header_end = data.find(b"\n") + 1
    if header_end == 0:
        raise fail("file is empty; expected header 'id,0,1,...,8191'")
    if data[:header_end] != HEADER:
        raise fail(_header_problem(data[: header_end - 1]), line=1)

    buffer = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buffer[header_end:] == ord("\n")) + header_end
    if len(ends) == 0:
        raise fail("holds a header but no prediction rows")
    if n_rows is not None and len(ends) != n_rows:
        raise fail(f"holds {len(ends)} rows, expected {n_rows}")
    starts = np.concatenate(([header_end], ends[:-1] + 1))

    ids = np.arange(len(ends))
    id_digits = np.ones_like(ids)
    for power in range(1, len(str(len(ids)))):
        id_digits += ids >= 10**power

    def row_error(row: int) -> DataError:
        return fail(_row_problem(data[starts[row] : ends[row]], row), line=row + 2)

    # A row of the wrong length cannot be read as fixed-width text. The rows before the first such
    # one are still checked below, so that the error always names the first bad line of the file.
    wrong_length = np.flatnonzero(ends - starts != id_digits + _ROW_TEXT_BYTES)
    n_fixed_width = int(wrong_length[0]) if len(wrong_length) else len(ids)
    masks = np.empty((len(ids), PIXELS), dtype=np.uint8)
    for row in range(n_fixed_width):
        start = int(starts[row])
        text_start = start + int(id_digits[row]) + 1
        if data[start:text_start] != b"%d," % row:
            raise row_error(row)
        text = buffer[text_start : text_start + _ROW_TEXT_BYTES - 1]
        np.subtract(text[::2], ord("0"), out=masks[row])
        if masks[row].max() > MAX_LABEL or np.any(text[1::2] != ord(",")):
            raise row_error(row)
    if n_fixed_width < len(ids):
        raise row_error(n_fixed_width)
    return masks.reshape(len(ids), IMAGE_HEIGHT, IMAGE_WIDTH)


def _header_problem(header: bytes) -> str:
    """Say how a header line differs from `id,0,1,...,8191` (called only once it does)."""
    names = header.split(b",")
    if names[0] != b"id":
        return f"header must start with 'id', got {_shown(names[0])}"
    if len(names) - 1 != PIXELS:
        return f"header has {len(names) - 1} pixel columns, expected {PIXELS}"
    for index, name in enumerate(names[1:]):
        if name != str(index).encode():
            return f"header names pixel column {index} {_shown(name)}, expected '{index}'"
    return "header does not match 'id,0,1,...,8191'"


def _row_problem(line: bytes, row: int) -> str:
    """Say what is wrong with data row `row` (id expected to equal `row`); slow, error path only."""
    fields = line.split(b",")
    if fields[0] != str(row).encode():
        return f"expected id {row}, got {_shown(fields[0])}"
    if len(fields) - 1 != PIXELS:
        return f"row has {len(fields) - 1} labels, expected {PIXELS}"
    for column, field in enumerate(fields[1:]):
        if field not in _LABEL_BYTES:
            return f"column {column} holds {_shown(field)}; labels must be 0..{MAX_LABEL}"
    return "malformed row"


def _shown(field: bytes) -> str:
    """Quote a field for a one-line message, truncated and with undecodable bytes escaped."""
    text = field[:40].decode("ascii", errors="backslashreplace")
    return repr(text + ("..." if len(field) > 40 else ""))
