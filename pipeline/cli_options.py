"""Flag parsing shared by the click commands (train, models, report): one definition each."""

from __future__ import annotations

from pipeline.storage import StorageOptions


def storage_options(s3_endpoint_url: str | None) -> StorageOptions:
    """--s3-endpoint-url wins; otherwise the environment (DFR_S3_ENDPOINT_URL, AWS_*)."""
    env = StorageOptions.from_env()
    if s3_endpoint_url:
        return StorageOptions(s3_endpoint_url=s3_endpoint_url, anon=env.anon)
    return env


def split_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeatable name option: `--only a --only b` and `--only a,b` both work."""
    return tuple(name.strip() for v in values for name in v.split(",") if name.strip())
