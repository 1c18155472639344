"""N+1 and eager loading: exact statement counts for each path and strategy, identical results,
bad ids refused."""

import asyncio
import re

import pytest

import source
from classroom import validation
from classroom.demos import n_plus_one
from classroom.demos.n_plus_one import (
    SCALE_UP_NAME_PREFIX,
    SCALE_UP_SCORES_PER_USER,
    compare_loading_strategies,
    count_scale_up_users,
    fetch_eager,
    fetch_naive,
    grow_scale_up_users,
    load_scale_up_users,
    remove_scale_up_users,
)
from classroom.sandboxes.reset import initialize_sandbox
from classroom.sandboxes.sandbox import new_sandbox_id
from classroom.statements import capture_statements
from pages.common.formatting import score_as_row
from source import AIRScoreRepository, get_session

UNKNOWN_ID = "3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11"
STRATEGIES = ["lazy", "selectinload", "joinedload", "subqueryload"]


def expected_statements(strategy: str, users: int) -> int:
    """What each strategy must issue for N users: 1 + N, 1 + one IN query per 500 parents, 1, 2."""
    return {
        "lazy": 1 + users,
        "selectinload": 1 + -(-users // 500),
        "joinedload": 1,
        "subqueryload": 2,
    }[strategy]


def without_schema(sql: str) -> str:
    """SQL as SQLite shows it: PostgreSQL sandboxes prefix every table with their schema."""
    return re.sub(r"\bqulab_[0-9a-f]+\.", "", sql)


async def user_id_named(sandbox: source.Sandbox, name: str) -> str:
    listed = await n_plus_one.list_users_with_score_counts(sandbox)
    return next(user.id for user in listed.users if user.name == name)


async def stored_scores(sandbox: source.Sandbox, user_id: str) -> list[source.AIRScore]:
    async with get_session(sandbox) as session:
        return await AIRScoreRepository(session).list_for_user(user_id)


# --- one user: the naive path against get_user_with_scores_eager -------------------------------


@pytest.mark.parametrize("scores", [0, 1, 3])
async def test_naive_path_runs_one_plus_one_plus_n_statements_and_eager_runs_two(
    sandbox_with_users, scores
):
    sandbox = sandbox_with_users
    alex = await user_id_named(sandbox, "Alex Smith")
    if scores:
        await source.add_sample_scores(sandbox, user_id=alex, count=scores)
    stored = [score.id for score in await stored_scores(sandbox, alex)]

    for _ in range(2):  # a second fetch costs the same: each runs in a fresh session
        naive = await fetch_naive(sandbox, user_id=alex)
        eager = await fetch_eager(sandbox, user_id=alex)
        assert naive.statements.count == 1 + 1 + scores
        assert eager.statements.count == 2

    sql = [without_schema(text) for text in naive.statements.sql()]
    assert "FROM users" in sql[0] and "WHERE users.id" in sql[0]
    assert sql[1].startswith("SELECT air_scores.id \nFROM air_scores") and "user_id" in sql[1]
    for statement, score_id in zip(naive.statements.statements[2:], stored, strict=True):
        assert "WHERE air_scores.id = " in without_schema(statement.sql) and score_id in str(
            statement.parameters
        )
    assert " IN (" in eager.statements.sql()[1]
    assert naive.user.id == eager.user.id == alex
    assert [score.id for score in naive.scores] == [score.id for score in eager.scores] == stored
    assert [score_as_row(s) for s in naive.scores] == [score_as_row(s) for s in eager.scores]
    assert naive.elapsed_ms > 0 and eager.elapsed_ms > 0


async def test_get_user_with_scores_eager_loads_the_collection_without_lazy_loading(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    jane = await user_id_named(sandbox, "Jane Doe")
    await source.add_sample_scores(sandbox, user_id=jane, count=4)
    with capture_statements() as log:
        async with get_session(sandbox) as session:
            user = await source.UserRepository(session).get_user_with_scores_eager(jane)
            assert len(user.scores) == 4  # plain attribute access: no MissingGreenlet, no SQL
    assert log.count == 2


async def test_sample_scores_are_valid_rows_for_that_user_only(sandbox_with_users):
    sandbox = sandbox_with_users
    alex = await user_id_named(sandbox, "Alex Smith")
    no_occupation = await source.create_user(sandbox, email="n.o@example.com", name="No Occupation")
    added = await source.add_sample_scores(sandbox, user_id=alex)
    await source.add_sample_scores(sandbox, user_id=no_occupation.id, count=1)
    assert len(added) == 3  # add_sample_scores' default: what the page's button adds
    rows = await stored_scores(sandbox, alex)
    assert [score.id for score in rows] == [score.id for score in added]
    for score in [*rows, *await stored_scores(sandbox, no_occupation.id)]:
        for value in (
            score.air_score,
            score.vr_score,
            score.hr_score,
            score.synergy_score,
            score.ci_lower,
            score.ci_upper,
        ):
            assert 0 <= value <= 100
        assert score.ci_lower <= score.air_score <= score.ci_upper
        assert validation.validate_occupation_code(score.occupation_code, required=True)
    assert {score.occupation_code for score in rows} == {"15-1252.00"}
    assert (await source.count_rows(sandbox))["air_scores"] == 4


@pytest.mark.parametrize(
    ("user_id", "error"),
    [
        ("", validation.MalformedIdError),
        ("   ", validation.MalformedIdError),
        ("not-a-uuid", validation.MalformedIdError),
        ("'; DROP TABLE air_scores; --", validation.MalformedIdError),
        ("<script>alert(1)</script>", validation.MalformedIdError),
        ("x" * 500, validation.MalformedIdError),
        (UNKNOWN_ID, source.UserNotFoundError),
    ],
)
def test_bad_ids_are_refused_by_every_path_and_write_nothing(runtime, user_id, error):
    lab = runtime.lab(new_sandbox_id())  # as a page runs them: through Lab.run
    lab.run(initialize_sandbox)
    for operation in (
        source.add_sample_scores,
        source.fetch_user_and_scores_naive,
        source.fetch_user_and_scores_eager,
        fetch_naive,
        fetch_eager,
    ):
        with pytest.raises(error):
            lab.run(operation, user_id=user_id)
    assert lab.run(source.count_rows) == {
        "users": 2,
        "assessments": 0,
        "air_scores": 0,
        "domain_events": 0,
        "consumed_events": 0,
    }


@pytest.mark.parametrize("count", [0, -1, 51, 2.5, True])
async def test_sample_score_count_out_of_range_is_refused(sandbox_with_users, count):
    alex = await user_id_named(sandbox_with_users, "Alex Smith")
    with pytest.raises(source.ValidationError):
        await source.add_sample_scores(sandbox_with_users, user_id=alex, count=count)
    assert (await source.count_rows(sandbox_with_users))["air_scores"] == 0


async def test_a_deleted_user_cannot_be_given_scores(sandbox_with_users):
    sandbox = sandbox_with_users
    jane = await user_id_named(sandbox, "Jane Doe")
    await source.delete_user(sandbox, user_id=jane)
    with pytest.raises(source.UserNotFoundError):
        await source.add_sample_scores(sandbox, user_id=jane)
    assert (await source.count_rows(sandbox))["air_scores"] == 0


# --- scale-up: N users, every strategy ----------------------------------------------------------


async def test_scale_up_users_grow_in_chunks_to_the_target_and_stay_apart_from_ordinary_users(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    alex = await user_id_named(sandbox, "Alex Smith")
    await source.add_sample_scores(sandbox, user_id=alex)
    sizes = [
        await grow_scale_up_users(sandbox, target_users=25, max_new_users=10) for _ in range(4)
    ]
    assert sizes == [10, 20, 25, 25]
    assert await count_scale_up_users(sandbox) == 25
    assert await source.count_rows(sandbox) == {
        "users": 2 + 25,
        "assessments": 0,
        "air_scores": 3 + 25 * SCALE_UP_SCORES_PER_USER,
        "domain_events": 0,
        "consumed_events": 0,
    }
    listed = await n_plus_one.list_users_with_score_counts(sandbox)
    assert [user.name for user in listed.users] == ["Alex Smith", "Jane Doe"]
    names = sorted(
        user.name
        for user in await source.list_users(sandbox, limit=100)
        if user.name.startswith("Scale")
    )
    assert names == [f"Scale-up user #{number:04d}" for number in range(1, 26)]


def test_no_form_can_create_a_user_that_looks_like_a_scale_up_user():
    with pytest.raises(source.ValidationError):
        validation.validate_name(f"{SCALE_UP_NAME_PREFIX}0001")


async def test_concurrent_growers_in_one_sandbox_never_overshoot(sandbox):
    await asyncio.gather(
        *(grow_scale_up_users(sandbox, target_users=20, max_new_users=20) for _ in range(3))
    )
    assert await count_scale_up_users(sandbox) == 20
    run = await load_scale_up_users(sandbox, strategy="selectinload", users=20)
    assert run.scores == 20 * SCALE_UP_SCORES_PER_USER


@pytest.mark.parametrize("target", [0, -5, 1001, 2.5, True, "10", None])
async def test_scale_up_targets_out_of_range_are_refused(sandbox, target):
    with pytest.raises(source.ValidationError):
        await grow_scale_up_users(sandbox, target_users=target)
    assert await count_scale_up_users(sandbox) == 0


async def test_every_strategy_issues_its_exact_statement_count_and_loads_the_same_rows(
    sandbox_with_users,
):
    sandbox = sandbox_with_users
    await source.add_sample_scores(sandbox, user_id=await user_id_named(sandbox, "Alex Smith"))
    await grow_scale_up_users(sandbox, target_users=100, max_new_users=100)
    digests = {}
    for users in (1, 10, 100):
        runs = [
            await load_scale_up_users(sandbox, strategy=strategy, users=users)
            for strategy in STRATEGIES
        ]
        assert {run.strategy: run.statements for run in runs} == {
            s: expected_statements(s, users) for s in STRATEGIES
        }
        assert {(run.users, run.scores) for run in runs} == {
            (users, users * SCALE_UP_SCORES_PER_USER)
        }
        assert len({run.results_digest for run in runs}) == 1
        digests[users] = runs[0].results_digest
        lazy = runs[0]
        assert [times for _, times in lazy.statement_sql] == [
            1,
            users,
        ]  # the users, then one query per user
    assert len(set(digests.values())) == 3


async def test_selectinload_batches_its_in_queries_by_500_at_a_thousand_users(sandbox):
    await grow_scale_up_users(sandbox, target_users=1000, scores_per_user=1, max_new_users=1000)
    runs = {s: await load_scale_up_users(sandbox, strategy=s, users=1000) for s in STRATEGIES}
    assert {s: run.statements for s, run in runs.items()} == {
        "lazy": 1001,
        "selectinload": 3,
        "joinedload": 1,
        "subqueryload": 2,
    }
    assert len({run.results_digest for run in runs.values()}) == 1
    assert {run.scores for run in runs.values()} == {1000}
    (users_sql, _), (in_sql, in_times) = runs["selectinload"].statement_sql
    assert in_times == 2 and in_sql.count(",") >= 499  # the same 500-parameter IN query, twice


async def test_loading_more_users_than_exist_or_an_unknown_strategy_is_refused(sandbox):
    await grow_scale_up_users(sandbox, target_users=5)
    with pytest.raises(source.ValidationError, match="Only 5 scale-up users"):
        await load_scale_up_users(sandbox, strategy="lazy", users=6)
    with pytest.raises(source.ValidationError, match="Choose a loading strategy"):
        await load_scale_up_users(sandbox, strategy="noload", users=5)


async def test_comparison_times_every_strategy_at_every_n(sandbox):
    await grow_scale_up_users(sandbox, target_users=20)
    comparison = await compare_loading_strategies(sandbox, sizes=[20, 5, 20], repeats=2)
    assert comparison.sizes == [5, 20]
    assert [(run.users, run.strategy) for run in comparison.runs] == [
        (n, s) for n in (5, 20) for s in STRATEGIES
    ]
    assert all(
        run.statements == expected_statements(run.strategy, run.users) for run in comparison.runs
    )
    assert all(len(run.times_ms) == 2 and run.median_ms > 0 for run in comparison.runs)
    assert comparison.identical_results
    with pytest.raises(source.ValidationError):
        await compare_loading_strategies(sandbox, sizes=[])


async def test_removing_scale_up_users_keeps_the_learners_own_users_and_scores(sandbox_with_users):
    sandbox = sandbox_with_users
    await source.add_sample_scores(sandbox, user_id=await user_id_named(sandbox, "Jane Doe"))
    await grow_scale_up_users(sandbox, target_users=30)
    assert await remove_scale_up_users(sandbox) == 30
    assert await source.count_rows(sandbox) == {
        "users": 2,
        "assessments": 0,
        "air_scores": 3,
        "domain_events": 0,
        "consumed_events": 0,
    }


async def test_the_naive_count_stays_exact_while_another_task_writes(sandbox_with_users):
    sandbox = sandbox_with_users
    alex = await user_id_named(sandbox, "Alex Smith")
    await source.add_sample_scores(sandbox, user_id=alex)
    naive, _ = await asyncio.gather(
        fetch_naive(sandbox, user_id=alex),
        grow_scale_up_users(sandbox, target_users=50, max_new_users=50),
    )
    assert naive.statements.count == 2 + 3
