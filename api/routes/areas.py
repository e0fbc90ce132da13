"""The area tree (county → township → community → grid → micro-grid), as the token sees it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import API_PREFIX, ConnDep, Page, Scope
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
      AND (%(include_inactive)s OR active)
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
) -> AreasPublic:
    """List the areas the token may see, from the top of the tree down."""
    params = {
        "scope": scope.as_param(),
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
