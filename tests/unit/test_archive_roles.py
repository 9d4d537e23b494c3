"""The roles a backup's privileges and policies name, read from the SQL pg_restore writes for
its ACL, DEFAULT ACL, POLICY and USER MAPPING entries; and which of them a server lacks."""

from __future__ import annotations

from pgkeeper.archive_roles import ArchiveRoles, roles_in_sql
from pgkeeper.sqltext import split_statements


def roles_of(sql: str) -> tuple[set[str], dict[str, str]]:
    return roles_in_sql(split_statements(sql))


def test_grantees_and_grantors_of_acl_entries_are_found() -> None:
    """GRANT ... TO and REVOKE ... FROM name their roles; SET SESSION AUTHORIZATION names the
    grantor; PUBLIC is everyone, not a role; quoted names keep their case and spaces."""
    privileges, others = roles_of(
        "REVOKE ALL ON FUNCTION public.f(a integer) FROM PUBLIC;\n"
        "GRANT ALL ON FUNCTION public.f(a integer) TO reader;\n"
        "GRANT SELECT ON TABLE shop.t TO \"Shop App\";\n"
        "GRANT SELECT(v) ON TABLE shop.t TO writer WITH GRANT OPTION;\n"
        "SET SESSION AUTHORIZATION granter;\n"
        "GRANT SELECT ON TABLE public.g TO owner2;\n"
        "RESET SESSION AUTHORIZATION;\n"
        "REVOKE ALL ON TABLE shop.t FROM shop_owner;\n"
    )

    assert privileges == {"reader", "Shop App", "writer", "granter", "owner2", "shop_owner"}
    assert others == {}


def test_a_to_inside_an_object_name_or_a_type_is_not_the_grantee() -> None:
    """The grantees follow the last TO: a quoted "a TO b" table or an ``interval day to
    second`` argument comes before it."""
    privileges, _ = roles_of(
        'GRANT INSERT ON TABLE public."a TO b" TO reader;\n'
        "GRANT ALL ON FUNCTION public.f(x interval day to second) TO app;\n"
        "REVOKE ALL ON TABLE public.\"from\" FROM old_reader CASCADE;\n"
    )

    assert privileges == {"reader", "app", "old_reader"}


def test_default_privileges_name_their_role_and_grantee() -> None:
    """ALTER DEFAULT PRIVILEGES FOR ROLE x ... GRANT ... TO y: both x and y."""
    privileges, _ = roles_of(
        "ALTER DEFAULT PRIVILEGES FOR ROLE owner2 IN SCHEMA shop GRANT SELECT ON TABLES  TO "
        "reader;\n"
        "ALTER DEFAULT PRIVILEGES FOR ROLE a, \"B\" REVOKE ALL ON FUNCTIONS FROM PUBLIC;\n"
        "ALTER DEFAULT PRIVILEGES GRANT USAGE ON TYPES TO typer;\n"
    )

    assert privileges == {"owner2", "reader", "a", "B", "typer"}


def test_policy_and_user_mapping_roles_are_the_ones_no_option_leaves_out() -> None:
    """A policy's TO list and a user mapping's role are kept apart from privileges, with what
    names them; PUBLIC and CURRENT_USER are no roles; a TO inside the expression is not."""
    privileges, others = roles_of(
        "CREATE POLICY p ON shop.t TO reader, clerk USING (true);\n"
        "CREATE POLICY q ON shop.t FOR SELECT USING ((x::interval day to second) IS NULL);\n"
        "CREATE POLICY r ON shop.t TO PUBLIC USING (true);\n"
        "CREATE USER MAPPING FOR etl SERVER remote OPTIONS (user 'x');\n"
        "CREATE USER MAPPING FOR public SERVER remote;\n"
        "CREATE USER MAPPING FOR CURRENT_USER SERVER remote;\n"
    )

    assert privileges == set()
    assert others == {
        "reader": "policy p",
        "clerk": "policy p",
        "etl": "a user mapping for server remote",
    }


def test_missing_roles_are_sorted_by_what_leaves_them_out() -> None:
    """Owners come from the listing's last field (an existing owner with a space in its name
    is matched by the line's end); privileges and others by name."""
    roles = ArchiveRoles(
        owner_entries=(
            "SCHEMA - shop postgres",
            "TABLE shop t shop_owner",
            "TABLE shop u my owner",
            "TABLE shop v gone owner",
        ),
        privileges=frozenset({"shop_app", "postgres"}),
        others={"clerk": "policy p"},
    )

    gaps = roles.missing_on({"postgres", "my owner"})

    assert gaps.owners == ["owner", "shop_owner"]  # "gone owner": its last word is all we know
    assert gaps.privileges == ["shop_app"]
    assert gaps.others == {"clerk": "policy p"}
    assert gaps.roles == ["clerk", "owner", "shop_app", "shop_owner"]
    assert not roles.missing_on({"postgres", "my owner", "owner", "shop_owner", "shop_app",
                                 "clerk"})  # fmt: skip
