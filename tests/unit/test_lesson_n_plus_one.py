"""Section 3's lesson alone: the N+1 path sends 1 + 1 + N statements, eager loading 2, and every
loading strategy returns the same users with the same scores."""

import pytest
from sqlalchemy import select

import source
from source import User


async def user_named(sandbox, name: str) -> User:
    return next(user for user in await source.list_users(sandbox) if user.name == name)


@pytest.mark.parametrize("n", [0, 3, 7])
async def test_naive_fetch_sends_one_plus_one_plus_n_statements_and_eager_sends_two(
    sandbox_with_users, statements, n
):
    sandbox = sandbox_with_users
    alex = await user_named(sandbox, "Alex Smith")
    added = await source.add_sample_scores(sandbox, user_id=alex.id, count=n) if n else []

    statements.reset()
    naive_user, naive_scores = await source.fetch_user_and_scores_naive(sandbox, user_id=alex.id)
    assert len(statements.statements) == 1 + 1 + n
    assert "FROM users" in statements.statements[0]
    assert statements.statements[1].startswith("SELECT air_scores.id")
    assert all("WHERE air_scores.id = " in sql for sql in statements.statements[2:])

    statements.reset()
    eager_user, eager_scores = await source.fetch_user_and_scores_eager(sandbox, user_id=alex.id)
    assert len(statements.statements) == 2
    assert " IN (" in statements.statements[1]

    assert naive_user.id == eager_user.id == alex.id
    stored = [score.id for score in added]  # created in this order: oldest first
    assert [score.id for score in naive_scores] == [score.id for score in eager_scores] == stored


@pytest.mark.parametrize(
    ("user_id", "error"),
    [("not-a-uuid", source.UserNotFoundError), (source.new_id(), source.UserNotFoundError)],
)
async def test_both_fetches_refuse_an_unknown_id(sandbox_with_users, user_id, error):
    for fetch in (source.fetch_user_and_scores_naive, source.fetch_user_and_scores_eager):
        with pytest.raises(error):
            await fetch(sandbox_with_users, user_id=user_id)


async def _users_with_scores(sandbox) -> dict[str, list[str]]:
    """Four users holding 0, 1, 2 and 3 scores; {user id: sorted score ids} as stored."""
    extra = [
        await source.create_user(sandbox, email=f"u{n}@example.com", name=f"User {chr(65 + n)}")
        for n in range(2)
    ]
    users = await source.list_users(sandbox)
    assert len(users) == 4 and {user.id for user in extra} <= {user.id for user in users}
    expected = {}
    for count, user in enumerate(sorted(users, key=lambda user: user.name)):
        added = (
            await source.add_sample_scores(sandbox, user_id=user.id, count=count) if count else []
        )
        expected[user.id] = sorted(score.id for score in added)
    return expected


@pytest.mark.parametrize(
    ("strategy", "statements_for"),
    [
        ("lazy", lambda users: 1 + users),
        ("selectinload", lambda users: 2),
        ("joinedload", lambda users: 1),
        ("subqueryload", lambda users: 2),
    ],
)
async def test_every_strategy_loads_the_same_users_and_scores_with_its_own_statement_count(
    sandbox_with_users, statements, strategy, statements_for
):
    sandbox = sandbox_with_users
    expected = await _users_with_scores(sandbox)
    query = select(User).order_by(User.name, User.id)

    statements.reset()
    loaded = await source.load_users_and_scores(sandbox.session_factory, query, strategy=strategy)
    assert len(statements.statements) == statements_for(len(expected))
    assert {user.id: sorted(score.id for score in scores) for user, scores in loaded} == expected
    names = [user.name for user, _ in loaded]
    assert names == sorted(names)  # each user once, in the query's order


async def test_lazy_loading_sends_one_statement_per_user(sandbox_with_users, statements):
    sandbox = sandbox_with_users
    expected = await _users_with_scores(sandbox)
    query = select(User).order_by(User.name)
    for users in (1, 2, 4):
        statements.reset()
        loaded = await source.load_users_and_scores(
            sandbox.session_factory, query.limit(users), strategy="lazy"
        )
        assert len(loaded) == users and len(statements.statements) == 1 + users
        assert all(sorted(s.id for s in scores) == expected[user.id] for user, scores in loaded)


async def test_an_unknown_strategy_is_refused_before_any_statement(sandbox_with_users, statements):
    statements.reset()
    with pytest.raises(source.ValidationError, match="Choose a loading strategy"):
        await source.load_users_and_scores(
            sandbox_with_users.session_factory, select(User), strategy="noload"
        )
    assert statements.statements == []
