"""The models as the pages show them (moved from tests/unit/test_models.py: needs pages)."""

from pages.common.formatting import entity_relationship_dot


def test_the_diagram_names_every_table_and_foreign_key():
    dot = entity_relationship_dot()
    for table in ("users", "assessments", "air_scores", "domain_events"):
        assert f"<b>{table}</b>" in dot
    assert "users -> assessments" in dot and "users -> air_scores" in dot
