"""Section 3: the repository pattern, and the N+1 problem shown with the SQL that really runs."""

import altair as alt
import pandas as pd
import streamlit as st

import source
from classroom.demos import n_plus_one
from pages.common import (
    CHART_PADDING,
    FULL_LABELS,
    SEEN_USER_IDS,
    kept_outcome,
    open_page,
    run_and_keep,
    run_or_report,
    show_code,
)
from pages.common.formatting import markdown_table, score_as_row
from pages.common.progress import demo_fragment, show_section_progress

lab = open_page()
USER_ID, PICK, ADDED = "n_plus_one_user_id", "n_plus_one_pick", "n_plus_one_added"
FETCHES, COMPARISON = "n_plus_one_fetches", "n_plus_one_comparison"
FETCH_BUTTONS = (
    ("naive", "Fetch User & Scores (Simulated N+1)", n_plus_one.fetch_naive),
    ("eager", "Fetch User & Scores (Eager Loading)", n_plus_one.fetch_eager),
)


def ids_listed(listed: n_plus_one.UserList | None) -> set[str]:
    return listed.ids() if listed is not None else set()


def typed_user_id() -> str:
    return str(st.session_state.get(USER_ID, "")).strip().lower()


def copy_picked_id() -> None:
    picked = st.session_state[PICK] or st.session_state[USER_ID]
    st.session_state[USER_ID], st.session_state[PICK] = picked, None


def add_scores() -> None:  # a callback: it runs before the page draws the user list
    operation = source.add_sample_scores
    run_and_keep(lab, ADDED, "No scores were added.", operation, user_id=typed_user_id())


@demo_fragment(lab)
def scores_and_fetches() -> None:
    """Steps 1 and 2 share the user id: one fragment, so a click reruns only them."""
    listed = render_add_scores()
    render_fetches(listed)


def render_add_scores() -> n_plus_one.UserList | None:
    st.subheader("Step 1: choose a user and give them some scores")
    listed = run_or_report(
        lab, "Could not list your users.", n_plus_one.list_users_with_score_counts
    )
    users = listed.users if listed is not None else ()
    if users:
        # A DataFrame, not Markdown: Markdown would turn a learner's email into a link.
        st.dataframe(pd.DataFrame(users), hide_index=True)
        names = {user.id: f"{user.name} ({user.scores} scores)" for user in users}
        st.selectbox(
            "Pick a user to copy their id",
            list(names),
            index=None,
            format_func=names.get,
            key=PICK,
            on_change=copy_picked_id,
            placeholder="Choose one of your users…",
        )
    else:
        st.info("Your sandbox has no users yet: initialize them in section 2, or create one in 1.")
    st.text_input("User ID", key=USER_ID, placeholder="paste or pick a user id (a UUID)")
    seen = st.session_state.setdefault(SEEN_USER_IDS, set())
    if listed is not None and listed.complete and typed_user_id() in seen - listed.ids():
        st.warning(
            "This user is no longer in your sandbox: section 2's initialize starts it fresh, "
            "and removed this user. Pick one of the users listed above."
        )
    seen.update(listed.ids() if listed is not None else ())
    st.button("Add 3 Sample Scores for User", type="primary", on_click=add_scores)
    if (added := kept_outcome(ADDED, keep=True)) and added[0].user_id in ids_listed(listed):
        st.success(f"Added {len(added)} sample scores; they are in the database now.")
        st.markdown(markdown_table([score_as_row(score) for score in added]))
    show_code(source.add_sample_scores, label="The code Add 3 Sample Scores for User runs")
    return listed


def render_fetches(listed: n_plus_one.UserList | None) -> None:
    st.subheader("Step 2: fetch the user and their scores, two ways")
    st.markdown(
        "Both buttons read the same rows in a fresh session and record every statement sent to "
        "the database. The first uses repository calls that look harmless on their own; the "
        "second asks for the scores up front with `selectinload(User.scores)`."
    )
    fetches = st.session_state.setdefault(FETCHES, {})
    for column, (path, label, operation) in zip(st.columns(2), FETCH_BUTTONS, strict=True):
        if column.button(label):
            user_id = typed_user_id()
            fetches[path] = run_or_report(
                lab, "Nothing was fetched.", operation, where=column, user_id=user_id
            )  # None when it failed: no older result stays on screen
        fetch = fetches.get(path)
        gone = (
            listed is not None and listed.complete and fetch and fetch.user.id not in listed.ids()
        )
        if gone:  # its rows were deleted since: show none of them
            fetch = fetches[path] = None
        if fetch is not None and fetch.user.id == typed_user_id():  # never an older user's
            measured = {
                "SQL statements": str(fetch.statements.count),
                "Time taken": f"{fetch.elapsed_ms:.1f} ms",
            }
            column.markdown(
                f"{markdown_table([measured])}\n\nStatements: {fetch.formula}. "
                f"In the database driver: {fetch.statements.total_ms:.1f} ms."
            )
            column.code(fetch.sql_listing(), language="sql", wrap_lines=True)
    shown = [f for f in fetches.values() if f is not None and f.user.id == typed_user_id()]
    if shown:  # both fetches read the same rows: one full-width table
        user, scores = shown[0].user, shown[0].scores
        # Plain text: Markdown would turn the email a learner typed into a link.
        st.text(
            f"{user.name} ({user.email}): {len(scores)} scores"
            + ("" if scores else ", add some in step 1")
        )
        if scores:
            st.markdown(markdown_table([score_as_row(score) for score in scores]))
    st.caption(
        "At a few scores the statement counts differ on every click, but the times do not tell "
        "the two apart: both take milliseconds and either may win. Step 3 grows N until the time "
        "follows the statement count."
    )
    show_code(
        source.fetch_user_and_scores_naive,
        source.AIRScoreRepository.list_ids_for_user,
        source.fetch_user_and_scores_eager,
        source.UserRepository.get_user_with_scores_eager,
        label="The code the two fetch buttons run",
    )


def show_comparison(comparison: n_plus_one.StrategyComparison) -> None:
    """The measured table, time against N on log axes, and the SQL each strategy sent."""
    if comparison.identical_results:
        st.success("At every N, all four strategies loaded exactly the same users and scores.")
    else:
        st.warning("The strategies loaded different rows: the scale-up users changed meanwhile.")
    rows = pd.DataFrame(comparison.rows())
    st.table(
        rows.assign(
            **{
                "median ms": rows["median ms"].map("{:.1f}".format),
                "÷ selectinload": rows["÷ selectinload"].map("{:.1f}×".format),
            }
        )
    )
    log = alt.Scale(type="log")
    chart = (
        alt.Chart(rows, padding=CHART_PADDING)
        .mark_line(point=True)
        .encode(
            x=alt.X("N (users):Q", scale=log, axis=FULL_LABELS, title="N (users, log scale)"),
            y=alt.Y(
                "median ms:Q", scale=log, axis=FULL_LABELS, title="median time (ms, log scale)"
            ),
            color=alt.Color("strategy:N", legend=alt.Legend(labelLimit=0)),
        )
    )
    st.altair_chart(chart)
    with st.expander(f"The SQL each strategy sent at N = {comparison.largest:,}"):
        for strategy, run in comparison.at(comparison.largest).items():
            st.markdown(f"**{strategy}**: {run.statements:,} statements")
            st.code(run.sql_listing(), language="sql", wrap_lines=True)


@demo_fragment(lab)
def render_scale_up() -> None:
    st.subheader("Step 3: scale it up")
    st.markdown(
        "One user with three scores cannot show N+1: the loop is too short. Here N users with "
        f"{n_plus_one.SCALE_UP_SCORES_PER_USER} scores each are loaded with each of SQLAlchemy's "
        "strategies, in a fresh session every time. The users are created in your sandbox the "
        "first time you ask (*Scale-up user #0001*, …; section 1's form refuses `#`, so your own "
        "users are never counted). Each strategy is warmed up once, then timed "
        f"{n_plus_one.COMPARISON_REPEATS} times; the table shows the median."
    )
    show_code(source.load_users_and_scores, label="The loading code this experiment runs")
    sizes = st.multiselect(
        "Numbers of users (N) to compare", n_plus_one.SCALE_UP_SIZES, default=[10, 100, 1000]
    )
    compare, remove = st.columns(2)
    if compare.button("Compare Loading Strategies", type="primary"):
        with st.spinner(
            "Timing the strategies in QuLab's experiment process, one learner at a time…"
        ):
            st.session_state[COMPARISON] = run_or_report(
                lab, "The comparison did not run.", n_plus_one.scale_up_and_compare, sizes=sizes
            )
    if remove.button("Remove Scale-up Users"):
        operation = n_plus_one.remove_scale_up_users
        if (removed := run_or_report(lab, "Nothing was removed.", operation)) is not None:
            st.session_state.pop(COMPARISON, None)
            st.success(f"Removed {removed:,} scale-up users and their scores; yours are untouched.")
    comparison = st.session_state.get(COMPARISON)
    if comparison is not None:
        operation = n_plus_one.count_scale_up_users
        remaining = run_or_report(lab, "Could not count the scale-up users.", operation)
        if remaining is not None and remaining < comparison.largest:
            st.info(
                "Your last comparison's users are gone (section 2's initialize, or Remove "
                "Scale-up Users, deleted them). Compare again to measure afresh."
            )
            st.session_state.pop(COMPARISON, None)
        else:
            show_comparison(comparison)


st.title("3. Repository Pattern & N+1")
st.markdown("""
A **repository** is the one place that knows how to read and write a model: pages and services
ask `UserRepository` for a user and never write SQL themselves, so queries can be changed, tuned
and tested in one spot.

A tidy repository API can still be slow. The **N+1 problem** is a loop that looks innocent in
Python: fetch a list, then touch each item's children, and every touch is another round trip to
the database. **Eager loading** tells SQLAlchemy up front which children you will need, so it
fetches them all together:
""")
st.latex(
    r"\underbrace{1 + N}_{\text{lazy}} \quad\text{vs.}\quad "
    r"\underbrace{2}_{\texttt{selectinload}} \quad\text{or}\quad "
    r"\underbrace{1}_{\texttt{joinedload}}"
)
scores_and_fetches()
render_scale_up()
st.markdown("""
**Which strategy when.** **lazy** (`await user.awaitable_attrs.scores`) suits one object, or
children you rarely need; in a loop it is 1 + N. **selectinload** is the usual choice for
collections: one extra `SELECT … IN (…)` per 500 parents (so N = 1,000 takes 3 statements).
**joinedload** suits many-to-one (`score.user`); on a collection it repeats each parent's
columns per child and needs `.unique()`. **subqueryload** is the older way: `selectinload` does
its job with a simpler second query.
""")
show_section_progress(lab, section=3)
