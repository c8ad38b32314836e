"""The submission CSV: byte-identical to the course's pandas helper, validated, atomic."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from marsseg import submission
from marsseg.classes import IMAGE_SHAPE, IMAGE_WIDTH, NUM_CLASSES
from marsseg.errors import DataError
from marsseg.submission import pandas_reference_csv, read_submission, write_submission

PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


def random_masks(n: int, seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, NUM_CLASSES, size=(n, *IMAGE_SHAPE)).astype(dtype)


def leftovers(folder: Path) -> list[str]:
    """Every file in `folder`: a failed write must leave no temporary file behind."""
    return sorted(path.name for path in folder.iterdir())


# Sizes around the id-width changes (9 -> 10, 99 -> 100) and over more than one row chunk.
@pytest.mark.parametrize("n", [1, 2, 12, 101])
def test_bytes_match_pandas_reference(tmp_path: Path, n: int) -> None:
    preds = random_masks(n, seed=n)
    pandas_reference_csv(preds, tmp_path / "reference.csv")
    returned = write_submission(preds, tmp_path / "ours.csv")
    assert returned == tmp_path / "ours.csv"
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()


def test_bytes_match_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks make ids continue correctly across several chunks and a short last one."""
    monkeypatch.setattr(submission, "ROWS_PER_CHUNK", 3)
    preds = random_masks(11, seed=3)
    pandas_reference_csv(preds, tmp_path / "reference.csv")
    write_submission(preds, tmp_path / "ours.csv")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint16, np.float32, np.float64])
def test_other_dtypes_write_the_same_bytes(tmp_path: Path, dtype: type) -> None:
    """Integer dtypes and integral floats (e.g. argmax cast to float) give the uint8 file."""
    preds = random_masks(2, seed=5)
    write_submission(preds, tmp_path / "uint8.csv")
    write_submission(preds.astype(dtype), tmp_path / "other.csv")
    assert (tmp_path / "other.csv").read_bytes() == (tmp_path / "uint8.csv").read_bytes()


def test_array_like_input(tmp_path: Path) -> None:
    preds = random_masks(1, seed=6)
    write_submission(preds.tolist(), tmp_path / "list.csv")
    assert np.array_equal(read_submission(tmp_path / "list.csv"), preds)


def test_header_and_c_order_layout(tmp_path: Path) -> None:
    """Pixel (r, c) of image i lands in column `r * 128 + c` of the row with id i."""
    row, col = 5, 17
    preds = np.zeros((3, *IMAGE_SHAPE), dtype=np.uint8)
    preds[1, row, col] = 4
    write_submission(preds, tmp_path / "sub.csv")
    content = (tmp_path / "sub.csv").read_bytes()

    assert content.endswith(b"\n") and b"\r" not in content
    lines = content.decode().split("\n")
    assert lines[-1] == ""  # exactly one final newline
    header, *rows = lines[:-1]
    assert header.split(",") == ["id", *map(str, range(PIXELS))]
    assert [line.split(",")[0] for line in rows] == ["0", "1", "2"]
    values = np.array([line.split(",")[1:] for line in rows], dtype=int)
    assert values.shape == (3, PIXELS)
    assert np.flatnonzero(values).tolist() == [PIXELS + row * IMAGE_WIDTH + col]
    assert header.split(",")[1 + row * IMAGE_WIDTH + col] == str(row * IMAGE_WIDTH + col)


def with_value(value: float, at: tuple[int, int, int] = (0, 3, 4)) -> np.ndarray:
    preds = random_masks(2, seed=7, dtype=np.float64)
    preds[at] = value
    return preds


@pytest.mark.parametrize(
    ("preds", "expected"),
    [
        (np.zeros((3, 64, 64), np.uint8), r"shape \(M, 64, 128\), got \(3, 64, 64\)"),
        (np.zeros(IMAGE_SHAPE, np.uint8), r"shape \(M, 64, 128\), got \(64, 128\)"),
        (np.zeros((0, *IMAGE_SHAPE), np.uint8), r"no masks: shape \(0, 64, 128\)"),
        (with_value(5).astype(np.uint8), r"label 5 at 1 pixel; labels must be 0\.\.4"),
        (with_value(-1).astype(np.int64), r"label -1 at 1 pixel; labels must be 0\.\.4"),
        (with_value(np.nan), r"NaN at 1 pixel"),
        (with_value(1.5), r"non-integral value 1\.5 at 1 pixel"),
        (with_value(np.inf), r"label inf at 1 pixel"),
        (np.ones((1, *IMAGE_SHAPE), bool), r"integer labels 0\.\.4, got dtype bool"),
        ([[[0, 1]], [[0]]], r"not an array"),
    ],
    ids=["shape", "2-D", "empty", "label 5", "negative", "NaN", "1.5", "inf", "bool", "ragged"],
)
def test_bad_predictions_raise_one_line(tmp_path: Path, preds: np.ndarray, expected: str) -> None:
    with pytest.raises(DataError, match=expected) as caught:
        write_submission(preds, tmp_path / "sub.csv")
    assert "\n" not in str(caught.value)
    assert leftovers(tmp_path) == []  # validation happens before anything touches the disk


def test_label_counts_name_each_bad_value(tmp_path: Path) -> None:
    preds = random_masks(2, seed=8, dtype=np.int16)
    preds[0, 0, :12] = 7
    preds[1, 5, :3] = -2
    with pytest.raises(DataError, match=r"outside 0\.\.4: -2 at 3 pixels, 7 at 12 pixels"):
        write_submission(preds, tmp_path / "sub.csv")


def fail_on_second_chunk(monkeypatch: pytest.MonkeyPatch, error: type[BaseException]) -> None:
    """Make the row-chunk encoder raise after the header and one chunk of rows were written."""
    encode = submission.encode_rows
    calls = []

    def encode_then_fail(*args: object) -> bytes:
        calls.append(args)
        if len(calls) == 2:
            raise error("interrupted midway")
        return encode(*args)

    monkeypatch.setattr(submission, "ROWS_PER_CHUNK", 2)
    monkeypatch.setattr(submission, "encode_rows", encode_then_fail)


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    fail_on_second_chunk(monkeypatch, error)
    with pytest.raises(error, match="interrupted midway"):
        write_submission(random_masks(5), tmp_path / "sub.csv")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_interrupted_write_keeps_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    target = tmp_path / "sub.csv"
    write_submission(random_masks(5, seed=1), target)
    before = target.read_bytes()
    fail_on_second_chunk(monkeypatch, error)
    with pytest.raises(error):
        write_submission(random_masks(5, seed=2), target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == ["sub.csv"]


def test_failed_replace_keeps_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure at the very last step, after the whole file was written, still cleans up."""
    target = tmp_path / "sub.csv"
    target.write_bytes(b"previous submission\n")

    def refuse(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(submission.os, "replace", refuse)
    with pytest.raises(KeyboardInterrupt):
        write_submission(random_masks(3), target)
    assert target.read_bytes() == b"previous submission\n"
    assert leftovers(tmp_path) == ["sub.csv"]


def test_existing_file_is_replaced(tmp_path: Path) -> None:
    """No overwrite guard here: the CLI decides with `--force`."""
    target = tmp_path / "sub.csv"
    target.write_bytes(b"old")
    preds = random_masks(2)
    write_submission(preds, target)
    assert np.array_equal(read_submission(target), preds)
    assert leftovers(tmp_path) == ["sub.csv"]


# ---- read_submission ----


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A valid 12-row submission (ids of one and two digits) and the masks it holds."""
    preds = random_masks(12, seed=9)
    return write_submission(preds, tmp_path / "sub.csv"), preds


def test_read_round_trips(written: tuple[Path, np.ndarray]) -> None:
    path, preds = written
    masks = read_submission(path, n_rows=12)
    assert masks.dtype == np.uint8
    assert masks.shape == (12, *IMAGE_SHAPE)
    assert np.array_equal(masks, preds)


def test_read_accepts_crlf_and_missing_final_newline(written: tuple[Path, np.ndarray]) -> None:
    path, preds = written
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n").removesuffix(b"\r\n"))
    assert np.array_equal(read_submission(path), preds)


def corrupt(path: Path, line: int, edit: tuple[bytes, bytes] | None = None) -> None:
    """Replace the first `edit[0]` in 0-based `line` with `edit[1]`, or drop the line."""
    lines = path.read_bytes().split(b"\n")
    if edit is None:
        del lines[line]
    else:
        lines[line] = lines[line].replace(*edit, 1)
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    ("line", "edit", "expected"),
    [
        (0, (b"id", b"ID"), r"line 1: header must start with 'id', got 'ID'"),
        (0, (b",8191", b""), r"line 1: header has 8191 pixel columns, expected 8192"),
        (0, (b",5,", b",6,"), r"line 1: header names pixel column 5 '6', expected '5'"),
        (3, None, r"line 4: expected id 2, got '3'"),
        (4, (b"3,", b"4,"), r"line 5: expected id 3, got '4'"),
        (5, (b",0", b",9"), r"line 6: column \d+ holds '9'; labels must be 0\.\.4"),
        (5, (b",0", b",x"), r"line 6: column \d+ holds 'x'; labels must be 0\.\.4"),
        (5, (b",0", b",10"), r"line 6: column \d+ holds '10'; labels must be 0\.\.4"),
        (5, (b",0", b",,"), r"line 6: row has 8193 labels, expected 8192"),
        (5, (b",0,", b",0;"), r"line 6: row has 8191 labels, expected 8192"),
        (5, (b",0,1", b",0,,1"), r"line 6: row has 8193 labels, expected 8192"),
    ],
    ids=[
        "header id",
        "header short",
        "header name",
        "missing row",
        "wrong id",
        "label 9",
        "letter",
        "two digits",
        "empty label",
        "semicolon",
        "extra field",
    ],
)
def test_read_rejects_corrupted_file(
    written: tuple[Path, np.ndarray], line: int, edit: tuple[bytes, bytes] | None, expected: str
) -> None:
    path, _ = written
    corrupt(path, line, edit)
    with pytest.raises(DataError, match=expected) as caught:
        read_submission(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


def test_read_rejects_missing_last_row_when_count_given(written: tuple[Path, np.ndarray]) -> None:
    path, _ = written
    corrupt(path, 12)  # the last data row: the file is still well formed, only short
    assert read_submission(path).shape[0] == 11
    with pytest.raises(DataError, match="holds 11 rows, expected 12"):
        read_submission(path, n_rows=12)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "file is empty"), (submission.HEADER, "holds a header but no prediction rows")],
)
def test_read_rejects_empty_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "sub.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        read_submission(path)


def test_gz_path_writes_compressed_reproducible_bytes(tmp_path: Path) -> None:
    preds = np.random.default_rng(3).integers(0, NUM_CLASSES, size=(5, *IMAGE_SHAPE))
    plain = write_submission(preds, tmp_path / "submission.csv")
    packed = write_submission(preds, tmp_path / "submission.csv.gz")
    again = write_submission(preds, tmp_path / "again.csv.gz")
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    assert packed.read_bytes() == again.read_bytes()  # no timestamp or name inside
    assert packed.stat().st_size < plain.stat().st_size
    np.testing.assert_array_equal(read_submission(packed, n_rows=5), preds)


def test_read_rejects_truncated_gzip(tmp_path: Path) -> None:
    preds = np.ones((3, *IMAGE_SHAPE), dtype=np.uint8)
    packed = write_submission(preds, tmp_path / "submission.csv.gz")
    packed.write_bytes(packed.read_bytes()[:40])
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_submission(packed)
