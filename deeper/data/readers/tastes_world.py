"""The diagnostic world's ratings (deeper/diagnostic.py): a test of the trainer, not of the paper's claim.

`path` is the MovieLens 100K folder of the embedded data (movielens100k_parquet): its items, with their genres
shown after each title ("Toy Story (1995) [Animation, Children's, Comedy]"), are rated by USERS synthetic users
instead of MovieLens' own. Each loves one genre and dislikes another (seeded) and rates RATINGS items by
deeper.diagnostic.rate (STEP stars per genre, Gaussian noise NOISE), half of them drawn from its two genres so
that every window says something about its tastes. Timestamps are the rating's position, so windows follow it.
MovieLens' own ratings are not read.
"""

from __future__ import annotations

from deeper.data.readers.common import Source, id_text, require_dir
from deeper.data.readers.movielens100k_parquet import ITEMS, read_columns
from deeper.diagnostic import GENRES, synthetic_users, with_genres
from deeper.errors import InputError

USERS = 400  # enough for 120 train and 40 evaluation users of the learning check, and more
RATINGS = 60  # six windows of 10
NOISE = 0.5  # standard deviation of a rating's noise, in stars
SEED = 0


def read(src: Source, sink) -> None:
    folder = require_dir(src.path)
    items_path = folder / ITEMS
    columns = read_columns(items_path, ("movie_id", "movie_title", *GENRES))
    catalog, ids = [], {}
    sink.add_domain(src.domain, src.item_type, src.format, str(folder), item_file=True)
    for row, movie in enumerate(columns["movie_id"], 1):
        genres = frozenset(g for g in GENRES if columns[g][row - 1])
        title = with_genres(str(columns["movie_title"][row - 1]), genres)
        item_id = id_text(movie, "movie_id", items_path, row)
        sink.title(src.domain, item_id, title)
        # an item without a genre says nothing about tastes; a repeated title (MovieLens has a few) is one item
        if genres and title not in ids:
            ids[title] = item_id
            catalog.append((str(columns["movie_title"][row - 1]), genres))
    try:
        users = synthetic_users(catalog, GENRES, USERS, RATINGS // 10, 10, seed=SEED, noise=NOISE)
    except ValueError as e:  # an items file with too few items per genre (not MovieLens 100K's)
        raise InputError(items_path, f"{e}; the tastes_world format needs MovieLens 100K's items") from None
    for user in users:
        rated = [item for window in user.windows for item in window]
        for position, (title, rating) in enumerate(rated):
            sink.rating(src.domain, user.user_id, ids[title], rating, position)
