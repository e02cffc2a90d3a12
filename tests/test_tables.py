"""The shared Parquet reader (deeper/tables.py) and the validated windows.parquet, on real files in tmp_path:
a missing file, a file that is not Parquet, a missing column, and bad rows each give one line naming the file
(and the row); the stages that read these files pass that line through."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from deeper.config import load_params
from deeper.data.schema import WINDOW_COLUMNS
from deeper.errors import InputError
from deeper.iteration import read_user_windows
from deeper.tables import domain_seen, read_parquet_checked, read_windows
from tests.conftest import REPO, one_line_error


def windows_frame() -> pd.DataFrame:
    """Two users of a seen domain (3 windows x 2 items) and one of an unseen domain, in file order."""
    rows = []
    for domain, seen, item_type, user, split in [
        ("movies", True, "movie", "u1", "train"),
        ("movies", True, "movie", "u2", "eval"),
        ("books", False, "book", "b1", "eval"),
    ]:
        for window in range(3):
            for pos in range(2):
                rows.append(
                    {
                        "domain": domain,
                        "item_type": item_type,
                        "seen": seen,
                        "user_id": user,
                        "split": split,
                        "window": window,
                        "pos": pos,
                        "item_id": f"{user}-{window}-{pos}",
                        "title": f"{item_type} {user} {window}.{pos}",
                        "rating": float(1 + (window + pos) % 5),
                    }
                )
    return pd.DataFrame(rows, columns=list(WINDOW_COLUMNS))


def error_of(call, *args) -> str:
    with pytest.raises(InputError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- read_parquet_checked


def test_reads_a_table_with_the_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "extra": [0.5, 1.5]}).to_parquet(path, index=False)
    df = read_parquet_checked(path, ("a", "b"), "run the t stage first")
    assert list(df.columns) == ["a", "b", "extra"] and df["b"].tolist() == ["x", "y"]


def test_a_missing_file_names_the_stage_to_run(tmp_path):
    path = tmp_path / "nope.parquet"
    assert (
        error_of(read_parquet_checked, path, ("a",), "run `dvc repro t` first")
        == f"{path}: not found; run `dvc repro t` first"
    )


@pytest.mark.parametrize("content", [b"domain,user_id\nmovies,u1\n", b"", b"PAR1 but cut short"])
def test_a_file_that_is_not_parquet_is_one_line(tmp_path, content):
    path = tmp_path / "t.parquet"
    path.write_bytes(content)
    assert error_of(read_parquet_checked, path, ("a",), "hint").startswith(
        f"{path}: not a readable Parquet file: "
    )


def test_a_damaged_parquet_file_is_one_line(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": range(100)}).to_parquet(path, index=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut off midway
    assert error_of(read_parquet_checked, path, ("a",), "hint").startswith(
        f"{path}: not a readable Parquet file: "
    )


def test_missing_columns_are_named_with_those_the_file_has(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1], "c": [2]}).to_parquet(path, index=False)
    assert (
        error_of(read_parquet_checked, path, ("a", "b", "d"), "run `dvc repro t` first")
        == f"{path}: missing column(s) b, d; have a, c; run `dvc repro t` first"
    )


# ---------------------------------------------------------------- read_windows


def test_read_windows_returns_the_sorted_table_and_the_seen_flag_per_domain(tmp_path):
    path = tmp_path / "windows.parquet"
    windows_frame().sample(frac=1.0, random_state=0).to_parquet(path, index=False)  # any row order
    df = read_windows(path)
    assert tuple(df.columns) == WINDOW_COLUMNS
    assert df.equals(
        windows_frame().sort_values(["domain", "user_id", "window", "pos"]).reset_index(drop=True)
    )
    assert domain_seen(df) == {"books": False, "movies": True}
    users = read_user_windows(path, split="eval")
    assert [(u.domain, u.user_id, u.item_type, len(u.windows)) for u in users] == [
        ("books", "b1", "book", 3),
        ("movies", "u2", "movie", 3),
    ]
    assert users[1].windows[1].titles == ("movie u2 1.0", "movie u2 1.1")


def _set(column, row, value):
    def edit(df):
        df = df.astype({column: object})
        df.loc[row, column] = value
        return df

    return edit


@pytest.mark.parametrize(
    "edit, row, message",
    [
        (
            lambda df: df.drop(columns=["seen"]),
            None,
            "missing column(s) seen; have domain, item_type, user_id",
        ),
        (_set("title", 4, "  "), 5, "title is missing or empty"),
        (_set("user_id", 2, None), 3, "user_id is missing or empty"),
        (_set("split", 7, "test"), 8, "split must be one of ['train', 'eval'], got 'test'"),
        (_set("rating", 3, np.nan), 4, "rating is not a finite number: nan"),
        (_set("window", 9, "two"), 10, "window is not a finite number: 'two'"),
        (_set("seen", 0, None), 1, "seen must be true or false, got None"),
        (_set("seen", 8, False), 9, "domain 'movies' is both seen and unseen"),
        (
            lambda df: pd.concat([df, df.iloc[[1]]], ignore_index=True),
            19,
            "duplicate (domain, user_id, window, pos)",
        ),
        (_set("item_type", 11, "book"), 12, "user u2 of movies has more than one item_type"),
        (_set("split", 1, "eval"), 2, "user u1 of movies has more than one split"),
        (
            lambda df: df[df["window"] != 1].reset_index(drop=True),
            3,
            "user u1 of movies has windows [0, 2], not 0..k-1",
        ),
        (lambda df: df[df["window"] != 0].reset_index(drop=True), 1, "user u1 of movies has no window 0"),
    ],
)
def test_bad_windows_are_one_line_errors_naming_file_and_row(tmp_path, edit, row, message):
    path = tmp_path / "windows.parquet"
    frame = edit(windows_frame())
    if "window" in frame and frame["window"].dtype == object:  # a text window: the file stores it as text
        frame = frame.astype({"window": str})
    frame.to_parquet(path, index=False)
    text = error_of(read_windows, path)
    where = f"{path}:{row}: " if row is not None else f"{path}: "
    assert text.startswith(where) and message in text, text


def test_a_gap_inside_the_file_points_at_the_first_out_of_place_row(tmp_path):
    """u2 keeps windows 0 and 2 only: the first row of its window 2 (row 9 in the file) is the one named."""
    frame = windows_frame()
    frame = frame[~((frame["user_id"] == "u2") & (frame["window"] == 1))].reset_index(drop=True)
    frame.to_parquet(tmp_path / "w.parquet", index=False)
    text = error_of(read_windows, tmp_path / "w.parquet")
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path / 'w.parquet'))}:9: user u2 of movies has windows \[0, 2\], "
        r"not 0\.\.k-1",
        text,
    ), text


# ---------------------------------------------------------------- the stages pass the line through


def test_train_stage_reports_a_pairs_file_that_is_not_parquet_and_a_bad_split_row(tmp_path):
    from stages.train import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(load_params(REPO / "params.yaml")))
    pairs = tmp_path / "pairs.parquet"
    args = [
        "--iteration",
        "1",
        "--params",
        str(tmp_path / "params.yaml"),
        "--pairs",
        str(pairs),
        "--out",
        str(tmp_path / "it1"),
        "--metrics",
        str(tmp_path / "train_it1.json"),
    ]
    pairs.write_text("context_id,prompt\n")
    one_line_error(CliRunner().invoke(main, args), f"{pairs}: not a readable Parquet file: ")
    pd.DataFrame(
        {
            "context_id": ["c0", "c1"],
            "prompt": "[]",
            "chosen": "a",
            "rejected": "b",
            "split": ["train", "test"],
        }
    ).to_parquet(pairs, index=False)
    one_line_error(CliRunner().invoke(main, args), f"{pairs}:2: split must be train or val, got 'test'")
    pd.DataFrame({"context_id": ["c0"], "prompt": "[]"}).to_parquet(pairs, index=False)
    one_line_error(CliRunner().invoke(main, args), f"{pairs}: missing column(s) chosen, rejected, split")
    assert not (tmp_path / "it1").exists() and not (tmp_path / "train_it1.json").exists()


def test_evaluate_reads_windows_through_the_shared_reader(tmp_path):
    from deeper.rollout import load_eval_users

    windows, personas = tmp_path / "windows.parquet", tmp_path / "init.parquet"
    frame = windows_frame()
    frame.to_parquet(windows, index=False)
    pd.DataFrame(
        {
            "domain": ["movies", "books"],
            "user_id": ["u2", "b1"],
            "split": "eval",
            "persona": ["likes films", "likes books"],
        }
    ).to_parquet(personas, index=False)
    users, skipped = load_eval_users(windows, personas, 1, None, None)
    assert [(u.domain, u.user_id, u.seen) for u in users] == [("books", "b1", False), ("movies", "u2", True)]
    assert skipped == {"too_few_windows": 0, "no_persona": 0}
    _set("seen", 15, True)(frame).to_parquet(windows, index=False)
    assert (
        error_of(load_eval_users, windows, personas, 1, None, None)
        == f"{windows}:16: domain 'books' is both seen and unseen"
    )
    windows.write_bytes(b"not parquet")
    assert error_of(load_eval_users, windows, personas, 1, None, None).startswith(
        f"{windows}: not a readable Parquet file: "
    )


def test_pair_stage_reports_a_rewards_file_that_is_not_parquet(tmp_path):
    from deeper.pairs import read_candidates

    contexts = pd.DataFrame({"context_id": ["c0"], "prompt": ["[]"]})
    rewards = tmp_path / "rewards.parquet"
    rewards.write_text("context_id,sample,text,r\n")
    assert error_of(read_candidates, rewards, contexts, "contexts.parquet").startswith(
        f"{rewards}: not a readable Parquet file: "
    )
    pd.DataFrame(
        {"context_id": ["c0", "c9"], "sample": [0, 0], "text": ["a", "b"], "r": [0.1, 0.2]}
    ).to_parquet(rewards, index=False)
    assert (
        error_of(read_candidates, rewards, contexts, "contexts.parquet")
        == f"{rewards}:2: context 'c9' is not in contexts.parquet"
    )


def test_report_reads_evaluation_tables_through_the_shared_reader(tmp_path):
    from deeper.rollout import read_eval_table

    path = tmp_path / "untrained.parquet"
    path.write_text("domain,user_id\n")
    assert error_of(read_eval_table, path, "untrained", 2).startswith(
        f"{path}: not a readable Parquet file: "
    )
    pd.DataFrame({"domain": ["movies"], "round": [0]}).to_parquet(path, index=False)
    text = error_of(read_eval_table, path, "untrained", 2)
    assert text.startswith(f"{path}: missing column(s) user_id, seen, persona,")
    assert text.endswith("; run `dvc repro evaluate@untrained`")
