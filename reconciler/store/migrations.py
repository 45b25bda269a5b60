"""Numbered SQL migrations: finding them, and deciding what a database still needs.

Files are `migrations/<dialect>/NNNN_name.sql`. The packaged copy (inside the wheel, at
`reconciler/migrations`) is preferred; a source checkout falls back to the top-level
`migrations/`. The `schema_migrations` table records number, name and sha256 of each applied
file. A database that has a migration this code does not know, or whose applied file has
since been edited, is refused with a clear message; backends apply what is missing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import MigrationError

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    number: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Applied:
    number: int
    name: str
    sha256: str


def migrations_dir(dialect: str) -> Path:
    package = Path(__file__).resolve().parent.parent
    for root in (package / "migrations", package.parent / "migrations"):
        if (root / dialect).is_dir():
            return root / dialect
    raise MigrationError(f"no migrations directory for {dialect} beside {package}")


def load(dialect: str) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(migrations_dir(dialect).iterdir()):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    numbers = [migration.number for migration in found]
    if numbers != list(range(1, len(found) + 1)):
        raise MigrationError(f"{dialect} migrations are not numbered 1..N: {numbers}")
    return found


def pending(known: list[Migration], applied: list[Applied]) -> list[Migration]:
    """What is left to apply; raises when the database does not match the code."""
    by_number = {migration.number: migration for migration in known}
    for record in applied:
        migration = by_number.get(record.number)
        if migration is None:
            raise MigrationError(
                f"the database has migration {record.number:04d}_{record.name}, which this "
                f"version of reconciler does not know: it was written by a newer version"
            )
        if migration.sha256 != record.sha256:
            raise MigrationError(
                f"migration {record.number:04d}_{record.name} was edited after it was applied "
                f"(sha256 {record.sha256[:12]}… in the database, {migration.sha256[:12]}… on disk)"
            )
    done = {record.number for record in applied}
    return [migration for migration in known if migration.number not in done]
