"""The area tree (county → township → community → grid → micro-grid), as the token sees it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import API_PREFIX, ConnDep, Page, Scope, area_filter
from devices.kinds import AreaLevel

router = APIRouter(prefix=f"{API_PREFIX}/areas", tags=["areas"])


class AreaPublic(BaseModel):
    id: str
    parent_id: str | None
    level: AreaLevel
    name: str
    active: bool


class AreasPublic(BaseModel):
    data: list[AreaPublic]
    count: int


_WHERE = """
    FROM areas
    WHERE (%(scope)s::text[] IS NULL OR id = ANY(%(scope)s))
      AND (%(within)s::text[] IS NULL OR id = ANY(%(within)s))
      AND (%(include_inactive)s OR active)
      AND (%(level)s::text IS NULL OR level = %(level)s)
"""


@router.get("")
def read_areas(
    *,
    conn: ConnDep,
    scope: Scope,
    page: Page,
    include_inactive: Annotated[
        bool, Query(description="Also list deactivated areas.")
    ] = False,
    area: Annotated[str | None, Query(description="An area id: it and everything below it.")] = None,
    level: Annotated[AreaLevel | None, Query(description="Only areas of this level.")] = None,
) -> AreasPublic:
    """List the areas the token may see, from the top of the tree down."""
    params = {
        "scope": scope.as_param(),
        "within": area_filter(conn, scope, area),
        "level": level.value if level else None,
        "include_inactive": include_inactive,
        "levels": [level.value for level in AreaLevel],
        "limit": page.limit,
        "offset": page.offset,
    }
    with conn.transaction():
        count_row = conn.execute("SELECT count(*) AS n" + _WHERE, params).fetchone()
        rows = conn.execute(
            "SELECT id, parent_id, level, name, active"
            + _WHERE
            + """
            ORDER BY array_position(%(levels)s::text[], level), id
            LIMIT %(limit)s OFFSET %(offset)s
            """,
            params,
        ).fetchall()
    assert count_row is not None
    return AreasPublic(data=[AreaPublic(**row) for row in rows], count=count_row["n"])
