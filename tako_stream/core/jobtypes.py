"""Job types: the environments requests can ask for, read from one TOML file."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path

from tako_stream.core.models import JobType


class JobTypes(Mapping[str, JobType]):
    """The configured job types by name; the packaged file unless one is given."""

    def __init__(self, types: Mapping[str, JobType]) -> None:
        if "default" not in types:
            raise ValueError("the job types file must define a 'default' job type")
        self._types = dict(types)

    @classmethod
    def load(cls, path: Path | None = None) -> JobTypes:
        if path is None:
            text = resources.files("tako_stream.core").joinpath("job_types.toml").read_text()
        else:
            text = path.read_text()
        raw = tomllib.loads(text)
        return cls({name: JobType(name=name, **fields) for name, fields in raw.items()})

    def __getitem__(self, name: str) -> JobType:
        return self._types[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)
