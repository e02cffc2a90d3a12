"""The diagnostic world (deeper/diagnostic.py), its `tastes` backend and the held-out pair report
(deeper/learning.py): rules by hand, through the real prompts and the response cache."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deeper.diagnostic import (
    GENRES,
    STEP,
    Tastes,
    predicted_rating,
    rate,
    rated_lines,
    rating_distribution,
    stated_tastes,
    tastes_from_ratings,
    title_genres,
    with_genres,
)
from deeper.learning import preference_report, world_users
from deeper.llm import Sampling, load_llm
from deeper.predict import WindowRequest, predict_windows
from deeper.prompts import PROMPT_SETS, load_prompts

T = Tastes


@pytest.mark.parametrize(
    "text, loved, disliked",
    [
        ("She loves comedies. She dislikes horror.", {"Comedy"}, {"Horror"}),
        ("A fan of science fiction and noir; not into romantic films.", {"Sci-Fi", "Film-Noir"}, {"Romance"}),
        ("He doesn't like westerns! Dramas are his favourite.", {"Drama"}, {"Western"}),
        ("Thrillers bore him\nHe enjoys kids' movies", {"Children's"}, {"Thriller"}),
        ("Loves war films. Hates war films.", set(), set()),  # both ways: neither
        ("Comedies and dramas.", set(), set()),  # no cue: nothing stated
        ("I'm ready to assist you. Please provide the persona.", set(), set()),
        ("", set(), set()),
    ],
)
def test_stated_tastes_reads_sentences_by_their_cues(text, loved, disliked):
    assert stated_tastes(text) == T(frozenset(loved), frozenset(disliked))


def test_every_described_taste_reads_back():
    for a, b in itertools.permutations(GENRES, 2):
        tastes = T(frozenset({a}), frozenset({b}))
        assert stated_tastes(tastes.describe()) == tastes
    both = T(frozenset({"Comedy", "Drama"}), frozenset({"Horror", "War"}))
    assert stated_tastes(both.describe()) == both
    assert stated_tastes(T(frozenset(), frozenset()).describe()) == T(frozenset(), frozenset())


def test_titles_carry_their_genres():
    title = with_genres("Toy Story (1995)", {"Comedy", "Animation", "Unknown genre"})
    assert title == "Toy Story (1995) [Animation, Comedy]"
    assert title_genres(title) == {"Animation", "Comedy"}
    assert title_genres("Heat (1995)") == frozenset() and title_genres("[Not a genre]") == frozenset()


def test_the_rating_rule_by_hand():
    tastes = T(frozenset({"Comedy", "Drama"}), frozenset({"Horror"}))
    assert predicted_rating(tastes, frozenset({"Comedy"})) == 3 + STEP
    assert predicted_rating(tastes, frozenset({"Comedy", "Drama"})) == 5.0  # 6 clipped
    assert predicted_rating(tastes, frozenset({"Comedy", "Horror"})) == 3.0
    assert predicted_rating(tastes, frozenset({"Horror"})) == 3 - STEP
    p = rating_distribution(4.5)
    assert p.sum() == pytest.approx(1) and p.argmax() == 3 and abs(p @ np.arange(1, 6) - 4.5) < 0.3
    rng = np.random.default_rng(0)
    assert {rate(tastes, frozenset({"Comedy"}), rng, 0.0) for _ in range(5)} == {4.0}  # 4.5 rounds to even
    noisy = [rate(tastes, frozenset({"Horror"}), rng, 1.0) for _ in range(200)]
    assert set(noisy) <= {1.0, 2.0, 3.0, 4.0, 5.0} and 1.3 < np.mean(noisy) < 2.0


def test_rated_lines_of_the_real_prompts():
    prompts = load_prompts()
    rated = [("Toy [Comedy]", 5.0), ('Say "Hi" [Horror]', 1.0)]
    init = prompts.render("init", item_type="movie", ratings=rated)[-1]["content"]
    assert rated_lines(init) == rated
    refine = prompts.render(
        "refine",
        item_type="movie",
        old_persona="p",
        comparisons=[("Toy [Comedy]", 3.2, 5.0), ('Say "Hi" [Horror]', 3.0, 1.0)],
    )[-1]["content"]
    assert rated_lines(refine) == rated  # the actual rating, not the predicted one
    assert tastes_from_ratings(rated) == T(frozenset({"Comedy"}), frozenset({"Horror"}))


@pytest.mark.parametrize("prompt_set", sorted(PROMPT_SETS))
def test_the_tastes_backend_reads_the_persona_of_each_prompt_set(prompt_set, tmp_path):
    from deeper.llm.cache import CachedLLM

    llm = CachedLLM(load_llm({"backend": "tastes", "name": "transparent"}), tmp_path)
    prompts = load_prompts(PROMPT_SETS[prompt_set])
    titles = ["Toy Story (1995) [Animation, Comedy]", "Scream (1996) [Horror]", "Heat (1995) [Action]"]
    right = WindowRequest("This viewer loves comedies. They dislike horror.", "movie", titles, [5, 1, 3])
    wrong = WindowRequest("This viewer loves horror. They dislike comedies.", "movie", titles, [5, 1, 3])
    none = WindowRequest("", "movie", titles, [5, 1, 3])
    preds, _ = predict_windows(llm, [right, wrong, none], None, prompts)
    assert np.round(preds[0].ratings, 1).tolist() == [4.5, 1.5, 3.0]
    assert preds[0].mae < preds[2].mae < preds[1].mae
    assert preds[2].ratings.tolist() == pytest.approx([3.0, 3.0, 3.0])
    again, _ = predict_windows(llm, [right], None, prompts)
    assert llm.hits == 3 and again[0].ratings.tolist() == pytest.approx(preds[0].ratings.tolist())
    # writing: from the rated lines of an S_0 prompt
    chat = prompts.render("init", item_type="movie", ratings=list(zip(titles, [5, 1, 3])))
    [[first, second]] = llm.generate([chat], 2, Sampling())
    assert first == second and stated_tastes(first) == T(
        frozenset({"Animation", "Comedy"}), frozenset({"Horror"})
    )


def test_the_tastes_backend_takes_no_adapter_and_names_its_rules():
    from deeper.diagnostic import RULE_VERSION

    with pytest.raises(Exception, match="models.frozen.adapter: the tastes backend has no weights"):
        load_llm({"backend": "tastes", "name": "transparent"}, adapter="x", where="models.frozen")
    assert RULE_VERSION in load_llm({"backend": "tastes", "name": "transparent"}).fingerprint


def test_world_users_rate_by_their_tastes():
    catalog = [(f"Film {i}", frozenset({GENRES[i % 4]})) for i in range(40)]
    users = world_users(catalog, GENRES[:4], 30, 3, 6, seed=4)
    assert users == world_users(catalog, GENRES[:4], 30, 3, 6, seed=4)  # seeded
    loved, disliked = [], []
    for user, tastes in users:
        assert len(tastes.loved) == len(tastes.disliked) == 1 and not tastes.loved & tastes.disliked
        assert len(user.windows) == 3 and all(len(w.titles) == 6 for w in user.windows)
        for w in user.windows:
            for title, rating in zip(w.titles, w.ratings):
                (
                    loved
                    if title_genres(title) & tastes.loved
                    else disliked
                    if title_genres(title) & tastes.disliked
                    else []
                ).append(rating)
    assert np.mean(loved) > 4.0 and np.mean(disliked) < 2.0
    fixed = world_users(catalog, GENRES[:4], 10, 2, 4, seed=4, loved="Action")
    assert all(
        t.loved == {"Action"} and len(t.disliked) == 1 and "Action" not in t.disliked for _, t in fixed
    )


def test_preference_report_by_hand():
    # log p(chosen), log p(rejected) of four pairs in three contexts
    policy = np.array([[-1.0, -3.0], [-2.0, -1.0], [-1.0, -2.0], [-5.0, -1.0]])
    base = np.array([[-2.0, -2.0], [-2.0, -2.0], [-1.5, -1.0], [-4.0, -2.0]])
    report = preference_report(policy, base, ["a", "a", "b", "c"], beta=0.5)
    assert report["pairs"] == 4 and report["contexts"] == 3
    assert report["policy_accuracy"]["estimate"] == 0.5 and report["base_accuracy"]["estimate"] == 0.0
    assert report["accuracy_gain"]["estimate"] == 0.5
    margins = 0.5 * np.array([(1 - -1), (0 - 1), (0.5 - -1), (-1 - 1)])
    assert report["implicit_margin"]["estimate"] == pytest.approx(margins.mean())
    assert report["reward_accuracy"]["estimate"] == 0.5
    for value in report.values():
        if isinstance(value, dict):
            assert value["low"] <= value["estimate"] <= value["high"]
    same = preference_report(policy, policy, ["a", "a", "b", "c"], beta=0.5)
    assert same["implicit_margin"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    assert same["accuracy_gain"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}


# ---------------------------------------------------------------- the world as an ingest source


def write_items(folder, n=30):
    """A MovieLens 100K items file (the embedded format) with genre flags: item i has genre i % 5 (and the
    first one none, the last two the same title)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    columns = {
        "movie_id": list(range(1, n + 1)),
        "movie_title": [f"Film {i}" for i in range(n - 1)] + ["Film 0"],
    }
    for k, genre in enumerate(GENRES):
        columns[genre] = [int(k < 5 and i % 5 == k and i > 0) for i in range(n - 1)] + [int(k == 0)]
    pq.write_table(pa.table(columns), folder / "MovieLens100k_items.parquet.brotli", compression="brotli")


def test_the_world_ingests_synthetic_users_on_the_items(tmp_path):
    import duckdb

    from deeper.data import readers
    from deeper.data.ingest import ingest
    from deeper.data.readers import tastes_world

    write_items(tmp_path / "ml")
    source = readers.Source("tastes_world", tmp_path / "ml", None, "world", "movie")
    summary = ingest([source], tmp_path / "ratings.duckdb")
    with duckdb.connect(str(tmp_path / "ratings.duckdb"), read_only=True) as con:
        tables = {name for (name,) in con.execute("SHOW TABLES").fetchall()}
        assert "ratings" in tables, (tables, summary)
        users, most, least = con.execute(
            "SELECT count(DISTINCT user_id), max(n), min(n) FROM (SELECT user_id, count(*) n FROM ratings "
            "GROUP BY user_id)"
        ).fetchone()
        titles = dict(con.execute("SELECT item_id, title FROM items").fetchall())
    assert users == tastes_world.USERS and most == least == tastes_world.RATINGS
    assert titles["2"] == "Film 1 [Adventure]" and titles["30"] == "Film 0 [Action]"
    assert "1" not in titles  # an item without a genre is never rated
    again = tmp_path / "again.duckdb"
    ingest([source], again)
    with (
        duckdb.connect(str(tmp_path / "ratings.duckdb"), read_only=True) as a,
        duckdb.connect(str(again), read_only=True) as b,
    ):
        query = "SELECT * FROM ratings ORDER BY ALL"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()  # seeded


def test_an_items_file_too_small_for_the_world_is_one_line_naming_it(tmp_path):
    from deeper.data import readers
    from deeper.data.ingest import ingest
    from deeper.errors import InputError

    write_items(tmp_path / "ml", n=6)  # one item per genre: no taste can show in a window
    with pytest.raises(InputError) as err:
        ingest(
            [readers.Source("tastes_world", tmp_path / "ml", None, "world", "movie")], tmp_path / "r.duckdb"
        )
    assert str(err.value).startswith(str(tmp_path / "ml" / "MovieLens100k_items.parquet.brotli") + ": ")
    assert "too few items" in str(err.value) and "\n" not in str(err.value)
