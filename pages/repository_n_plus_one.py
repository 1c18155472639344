"""Section 3: the repository pattern, and the N+1 problem shown with the SQL that really runs."""

import pandas as pd
import streamlit as st

import source
from pages import open_page
from pages.progress import show_section_progress

lab = open_page()
USER_ID_KEY = "n_plus_one_user_id"
PICK_KEY = "n_plus_one_pick"
FETCHES_KEY = "n_plus_one_fetches"
COMPARISON_KEY = "n_plus_one_comparison"
ADDED_KEY = "n_plus_one_added"
SQL_PREVIEW_CHARACTERS = 700

st.title("3. Repository Pattern & N+1")
st.markdown(
    """
A **repository** is the one place that knows how to read and write a model: pages and services
ask `UserRepository` for a user and never write SQL themselves, so the queries can be changed,
tuned and tested in one spot.

A tidy repository API can still be slow. The **N+1 problem** is a loop that looks innocent in
Python: fetch a list, then touch each item's children, and every touch is another round trip to
the database. **Eager loading** tells SQLAlchemy up front which children you will need, so it
fetches them all together:
"""
)
st.latex(r"\underbrace{1 + N}_{\text{lazy, one query per parent}} \quad\text{vs.}\quad \underbrace{2}_{\texttt{selectinload}} \quad\text{or}\quad \underbrace{1}_{\texttt{joinedload}}")
with st.expander("The repository code this page runs (read from source.py)"):
    for code in (
        source.UserRepository.get_user_with_scores_eager,
        source.AIRScoreRepository.list_ids_for_user,
        source.fetch_user_and_scores_naive,
        source.fetch_user_and_scores_eager,
        source.add_sample_scores,
    ):
        st.code(source.source_code(code), language="python")


def copy_picked_id() -> None:
    """Put the picked user's id into the id box, then clear the pick so it can be used again."""
    if st.session_state.get(PICK_KEY):
        st.session_state[USER_ID_KEY] = st.session_state[PICK_KEY]
    st.session_state[PICK_KEY] = None


def add_sample_scores() -> None:
    """Runs before the page renders, so the user list above the button already counts the new scores."""
    try:
        st.session_state[ADDED_KEY] = lab.run(
            source.add_sample_scores, user_id=st.session_state.get(USER_ID_KEY, ""), count=source.SAMPLE_SCORES_PER_CLICK
        )
    except source.QuLabError as error:
        st.session_state[ADDED_KEY] = error


def scores_table(scores: list[source.AIRScore], *, short_ids: bool = False):
    """Scores as a small table: id, the four scores and the confidence interval, one decimal."""
    rows = pd.DataFrame([source.score_as_row(score) for score in scores])
    shown = ["id", "air_score", "vr_score", "hr_score", "synergy_score", "ci_lower", "ci_upper"]
    if short_ids:  # half-width columns: the first 8 characters still match the SQL parameters below
        rows["id"] = rows["id"].str[:8] + "…"
    return rows[shown].style.format(precision=1)


def show_fetch(fetch: source.UserScoresFetch, column) -> None:
    """One fetch: the user, their scores, how many statements it took, the SQL of each, the time."""
    scores = len(fetch.scores)
    if fetch.path == "naive":
        column.markdown("**Simulated N+1:** the user, their score ids, then each score by id")
        formula = f"{source.NAIVE_STATEMENT_FORMULA} with N = {scores}"
    else:
        column.markdown("**Eager loading:** the user, then all their scores in one `IN` query")
        formula = f"{source.EAGER_STATEMENT_FORMULA}, whatever N is (here N = {scores})"
    left, right = column.columns(2)
    left.metric("SQL statements", fetch.statements.count)
    right.metric("Time taken", f"{fetch.elapsed_ms:.2f} ms")
    column.caption(f"Statements: {formula}. Time in the database driver: {fetch.statements.total_ms:.2f} ms.")
    column.dataframe(
        pd.DataFrame([{"name": fetch.user.name, "email": fetch.user.email, "id": fetch.user.id}]), hide_index=True
    )
    if fetch.scores:
        column.table(scores_table(fetch.scores, short_ids=True))
    else:
        column.info("This user has no scores yet: click Add 3 Sample Scores for User first.")
    column.code(
        "\n\n".join(
            f"-- statement {number}: {statement.duration_ms:.3f} ms, parameters {statement.parameters}\n{statement.sql}"
            for number, statement in enumerate(fetch.statements.statements, start=1)
        ),
        language="sql",
    )


st.subheader("Step 1: choose a user and give them some scores")
try:
    users = lab.run(source.list_users_with_score_counts)
except source.QuLabError as error:
    st.error(f"Could not list your users. {error}")
    users = []
if users:
    st.dataframe(pd.DataFrame(users), hide_index=True)
    names = {user["id"]: f"{user['name']} ({user['scores']} scores)" for user in users}
    st.selectbox(
        "Pick a user to copy their id",
        list(names),
        index=None,
        format_func=names.get,
        key=PICK_KEY,
        on_change=copy_picked_id,
        placeholder="Choose one of your users…",
    )
else:
    st.info("Your sandbox has no users yet: initialize the sample users in section 2, or create one in section 1.")
user_id = st.text_input("User ID", key=USER_ID_KEY, placeholder="paste or pick a user id (a UUID)")

st.button("Add 3 Sample Scores for User", type="primary", on_click=add_sample_scores)
outcome = st.session_state.pop(ADDED_KEY, None)
if isinstance(outcome, source.QuLabError):
    st.error(f"No scores were added. {outcome}")
elif outcome:
    st.success(f"Added {len(outcome)} sample scores; they are in the database now.")
    st.table(scores_table(outcome))

st.subheader("Step 2: fetch the user and their scores, two ways")
st.markdown(
    "Both buttons read the same rows in a fresh session and record every statement sent to the "
    "database. The first uses repository calls that look harmless on their own; the second asks "
    "for the scores up front with `selectinload(User.scores)`."
)
fetches = st.session_state.setdefault(FETCHES_KEY, {})
left, right = st.columns(2)
for column, label, operation in (
    (left, "Fetch User & Scores (Simulated N+1)", source.fetch_user_and_scores_naive),
    (right, "Fetch User & Scores (Eager Loading)", source.fetch_user_and_scores_eager),
):
    if column.button(label):
        try:
            fetch = lab.run(operation, user_id=user_id)
        except source.QuLabError as error:
            column.error(f"Nothing was fetched. {error}")
        else:
            fetches[fetch.path] = fetch
for column, path in ((left, "naive"), (right, "eager")):
    if path in fetches:
        show_fetch(fetches[path], column)
st.caption(
    "With a handful of scores both take a millisecond or two and the times are mostly noise; the "
    "statement counts are what grow. Step 3 lets N grow until the difference is plain."
)

st.subheader("Step 3: scale it up")
st.markdown(
    f"""
One user with three scores cannot show N+1: the loop is too short. Here N users with
{source.SCALE_UP_SCORES_PER_USER} scores each are loaded with each of SQLAlchemy's strategies, in
a fresh session every time. The users are created in your sandbox the first time you ask for
them (they are named *Scale-up user #0001*, *#0002*, …; a name with `#` cannot come from the
form in section 1, so your own users are never counted). Every strategy is warmed up once, then
timed {source.COMPARISON_REPEATS} times in turn; the table shows the median.
"""
)


def run_comparison(sizes: list[int]) -> None:
    """Create the scale-up users still missing (moving a progress bar), then time every strategy."""
    target = max(sizes)
    bar = st.progress(0.0, text="Counting scale-up users…")
    try:
        ready = lab.run(source.count_scale_up_users)
        while ready < target:
            ready = lab.run(source.grow_scale_up_users, target_users=target)
            bar.progress(min(1.0, ready / target), text=f"{ready:,} of {target:,} scale-up users ready")
        bar.progress(1.0, text="Timing the four strategies…")
        st.session_state[COMPARISON_KEY] = lab.run(source.compare_loading_strategies, sizes=sizes, repeats=source.COMPARISON_REPEATS)
    except source.QuLabError as error:
        st.error(f"The comparison did not run. {error}")
    finally:
        bar.empty()


def show_comparison(comparison: source.StrategyComparison) -> None:
    """The measured table, the chart of time against N, the ratio, and the SQL each strategy sent."""
    if comparison.identical_results:
        st.success("At every N, all four strategies loaded exactly the same users and the same scores.")
    else:
        st.warning("The strategies loaded different rows: the scale-up users changed during the run.")
    largest = comparison.sizes[-1]
    at_largest = comparison.at(largest)
    ratio = at_largest["lazy"].median_ms / at_largest["selectinload"].median_ms
    left, middle, right = st.columns(3)
    left.metric(f"lazy at N = {largest:,}", f"{at_largest['lazy'].statements:,} statements")
    middle.metric(f"selectinload at N = {largest:,}", f"{at_largest['selectinload'].statements:,} statements")
    right.metric(f"lazy ÷ selectinload time at N = {largest:,}", f"{ratio:.1f}×")
    table = pd.DataFrame(
        [
            {
                "N (users)": run.users,
                "strategy": run.strategy,
                "statements": run.statements,
                "scores loaded": run.scores,
                "median ms": run.median_ms,
                "÷ selectinload": run.median_ms / comparison.at(run.users)["selectinload"].median_ms,
                "all runs (ms)": ", ".join(f"{time_ms:.1f}" for time_ms in run.times_ms),
            }
            for run in comparison.runs
        ]
    )
    st.table(table.style.format({"median ms": "{:.2f}", "÷ selectinload": "{:.1f}×"}))
    st.line_chart(table, x="N (users)", y="median ms", color="strategy", x_label="N (users)", y_label="median time (ms)")
    with st.expander(f"The SQL each strategy sent at N = {largest:,}"):
        for strategy, run in at_largest.items():
            st.markdown(f"**{strategy}**: {run.statements:,} statements")
            st.code(
                "\n\n".join(
                    f"-- sent {times:,}×\n{sql[:SQL_PREVIEW_CHARACTERS]}{' …' if len(sql) > SQL_PREVIEW_CHARACTERS else ''}"
                    for sql, times in run.statement_sql
                ),
                language="sql",
            )


with st.expander("The loading code this experiment runs (read from source.py)"):
    st.code(source.source_code(source.load_scale_up_users), language="python")
    st.code(source.source_code(source.grow_scale_up_users), language="python")

sizes = st.multiselect("Numbers of users (N) to compare", source.SCALE_UP_SIZES, default=[10, 100, 1000])
compare_column, remove_column = st.columns(2)
if compare_column.button("Compare Loading Strategies", type="primary"):
    if sizes:
        run_comparison(sizes)
    else:
        st.error("Choose at least one number of users.")
if remove_column.button("Remove Scale-up Users"):
    try:
        removed = lab.run(source.remove_scale_up_users)
    except source.QuLabError as error:
        st.error(f"Nothing was removed. {error}")
    else:
        st.session_state.pop(COMPARISON_KEY, None)
        st.success(f"Removed {removed:,} scale-up users and their scores; your own users are untouched.")
if COMPARISON_KEY in st.session_state:
    show_comparison(st.session_state[COMPARISON_KEY])

st.markdown(
    """
**Which strategy when**

- **lazy** (`await user.awaitable_attrs.scores`): fine for one object, or when you rarely need
  the children. In async code the await makes each round trip visible; in a loop it is 1 + N.
- **selectinload**: the usual choice for collections (one-to-many, many-to-many). One extra
  `SELECT … WHERE user_id IN (…)` per 500 parents, which is why N = 1,000 takes 3 statements.
- **joinedload**: the usual choice for many-to-one (`score.user`): one row per child, nothing
  repeated. On a collection it repeats every parent's columns once per child, needs `.unique()`,
  and with `LIMIT` wraps the parent query in a subquery.
- **subqueryload**: the older way to load collections: it re-runs the parent query inside the
  second one. `selectinload` does the same job with a simpler second query.
"""
)

show_section_progress(lab, section=3)
