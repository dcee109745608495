"""Where archive files live: a local directory or an object store (s3://bucket/prefix).

Both give the archive the same few operations on files named by their path relative to the
archive root ('/'-separated, e.g. ``metric=cpu/date=2026-01-01/part-<hash>.parquet``): write
whole bytes, read them back, list a partition or the whole tree, delete, and hand pyarrow a
filesystem to read Parquet datasets from. Writes are whole-object (a local file is written to
a temporary name and renamed; an S3 PUT is atomic), so a reader never sees half a file.

Object storage goes through pyarrow's S3FileSystem (reads, lists, deletes, plain writes).
With `archive_lock_days` set, objects are written with boto3 instead, since pyarrow cannot set
per-object lock headers: ObjectLockMode=COMPLIANCE and a RetainUntilDate, on a bucket that must
have object lock enabled (checked before anything is deleted). Every failure is an
ArchiveError of one line, raised before the run deletes any row.
"""

from __future__ import annotations

import base64
import hashlib
import os
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from metricmill.errors import MetricmillError
from metricmill.secrets import redact, remember
from metricmill.settings import check_archive_url

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from metricmill.settings import Settings


class ArchiveError(MetricmillError):
    """The archive cannot be written or does not read back as written: nothing was deleted."""


def _one_line(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split())) or type(exc).__name__


class ArchiveRoot(ABC):
    """The archive's files, by path relative to its root."""

    @abstractmethod
    def show(self, relative: str = "") -> str:
        """How a file (or the root) is named in messages."""

    @abstractmethod
    def probe(self, *, lock: bool = False) -> None:
        """ArchiveError unless a file can be written (and, with `lock`, locked) here."""

    @abstractmethod
    def read(self, relative: str) -> bytes | None:
        """A file's bytes; None when it does not exist."""

    @abstractmethod
    def write(self, relative: str, data: bytes, retain_until: datetime | None = None) -> None:
        """Write a whole file (`retain_until`: compliance lock until then, object stores)."""

    @abstractmethod
    def listdir(self, directory: str) -> list[str]:
        """Names of the files directly in a directory (none if it does not exist)."""

    @abstractmethod
    def parts(self, directory: str = "") -> list[str]:
        """Relative paths of every part-*.parquet under a directory, sorted."""

    @abstractmethod
    def delete(self, relative: str) -> None:
        """Remove a file (missing is fine)."""

    @abstractmethod
    def dataset_source(self, relatives: list[str]) -> tuple[list[str], pafs.FileSystem | None]:
        """Paths and filesystem for pyarrow.dataset to read these files."""


class LocalRoot(ArchiveRoot):
    def __init__(self, root: Path) -> None:
        self.root = root

    def show(self, relative: str = "") -> str:
        return str(self.root / relative) if relative else str(self.root)

    def probe(self, *, lock: bool = False) -> None:
        if lock:
            raise ArchiveError(
                "archive lock days (METRICMILL_ARCHIVE_LOCK_DAYS or a retention rule's "
                "--lock-days) need an object store with object lock "
                f"(archive_dir = s3://BUCKET/PREFIX), not the directory {self.root}: "
                "nothing deleted"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ArchiveError(
                f"archive directory {self.root} is not writable ({exc.strerror or exc}): "
                "nothing deleted"
            ) from None

    def read(self, relative: str) -> bytes | None:
        path = self.root / relative
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArchiveError(f"cannot read {path}: {exc.strerror or exc}") from None

    def write(self, relative: str, data: bytes, retain_until: datetime | None = None) -> None:
        target = self.root / relative
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ArchiveError(f"cannot write {target}: {reason}; nothing deleted") from None
        finally:
            tmp.unlink(missing_ok=True)

    def listdir(self, directory: str) -> list[str]:
        folder = self.root / directory
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def parts(self, directory: str = "") -> list[str]:
        base = self.root / directory
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("part-*.parquet"))

    def delete(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def dataset_source(self, relatives: list[str]) -> tuple[list[str], pafs.FileSystem | None]:
        return [str(self.root / r) for r in relatives], None


class S3Root(ArchiveRoot):
    """s3://bucket/prefix through pyarrow's S3FileSystem (boto3 for locked writes)."""

    def __init__(self, url: str, settings: Settings, *, lock_days: int = 0) -> None:
        import pyarrow.fs as pafs

        from metricmill.settings import secret_setting

        parts = urlsplit(check_archive_url(url))
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.lock_days = lock_days
        try:
            secret = secret_setting(
                settings.archive_s3_secret_access_key, settings.archive_s3_secret_access_key_block
            )
        except ValueError as exc:
            raise ArchiveError(str(exc)) from None
        remember(secret)
        key_id = settings.archive_s3_access_key_id or None
        if bool(key_id) != bool(secret):
            raise ArchiveError(
                "set both METRICMILL_ARCHIVE_S3_ACCESS_KEY_ID and the secret access key "
                "(METRICMILL_ARCHIVE_S3_SECRET_ACCESS_KEY or its _BLOCK), or neither "
                "(the AWS default credentials)"
            )
        self._key_id, self._secret = key_id, secret
        self._endpoint = settings.archive_s3_endpoint
        self._region = settings.archive_s3_region
        self._timeout = settings.archive_s3_timeout_seconds
        options: dict[str, Any] = {
            "connect_timeout": min(self._timeout, 10.0),
            "request_timeout": self._timeout,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        }
        if key_id:
            options |= {"access_key": key_id, "secret_key": secret}
        if self._region:
            options["region"] = self._region
        if self._endpoint:
            scheme, _, host = self._endpoint.partition("://")
            options |= {"endpoint_override": host, "scheme": scheme}
        try:
            self.fs = pafs.S3FileSystem(**options)
        except (OSError, ValueError, TypeError) as exc:
            raise ArchiveError(f"cannot open {url}: {_one_line(exc)}") from None
        self._client: Any = None

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _path(self, relative: str) -> str:
        return f"{self.bucket}/{self._key(relative)}".rstrip("/")

    def show(self, relative: str = "") -> str:
        return f"{self.url}/{relative}" if relative else self.url

    def client(self) -> Any:
        """A boto3 S3 client with the same endpoint, region and keys (for object lock)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self._endpoint,
                region_name=self._region or None,
                aws_access_key_id=self._key_id,
                aws_secret_access_key=self._secret,
                config=Config(
                    connect_timeout=min(self._timeout, 10.0),
                    read_timeout=self._timeout,
                    retries={"max_attempts": 3, "mode": "standard"},
                ),
            )
        return self._client

    def _fail(self, action: str, relative: str, exc: BaseException) -> ArchiveError:
        return ArchiveError(f"cannot {action} {self.show(relative)}: {_one_line(exc)}")

    def probe(self, *, lock: bool = False) -> None:
        relative = f".probe-{os.getpid()}"
        try:
            if lock:
                found = self.client().get_object_lock_configuration(Bucket=self.bucket)
                enabled = found.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
                if enabled != "Enabled":
                    raise ArchiveError(f"bucket {self.bucket} has object lock {enabled}")
                self.client().put_object(Bucket=self.bucket, Key=self._key(relative), Body=b"")
            else:
                with self.fs.open_output_stream(self._path(relative)) as sink:
                    sink.write(b"")
            self.fs.delete_file(self._path(relative))
        except Exception as exc:  # network, credentials, bucket, lock: all one message
            text = _one_line(exc)
            if "ObjectLockConfigurationNotFound" in text:
                text = (
                    f"bucket {self.bucket} has no object lock, which archive lock days need "
                    "(METRICMILL_ARCHIVE_LOCK_DAYS or a retention rule's --lock-days; create "
                    "the bucket with object lock enabled)"
                )
            raise ArchiveError(
                f"archive {self.url} is not writable ({text}): nothing deleted"
            ) from None

    def read(self, relative: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._path(relative)) as source:
                return bytes(source.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail("read", relative, exc) from None

    def write(self, relative: str, data: bytes, retain_until: datetime | None = None) -> None:
        try:
            if retain_until is None:
                with self.fs.open_output_stream(self._path(relative)) as sink:
                    sink.write(data)
            else:
                self.client().put_object(
                    Bucket=self.bucket,
                    Key=self._key(relative),
                    Body=data,
                    ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
                    ObjectLockMode="COMPLIANCE",
                    ObjectLockRetainUntilDate=retain_until,
                )
        except Exception as exc:  # OSError from pyarrow, botocore's errors from boto3
            raise ArchiveError(
                f"cannot write {self.show(relative)}: {_one_line(exc)}; nothing deleted"
            ) from None

    def _list(self, directory: str, recursive: bool) -> list[str]:
        import pyarrow.fs as pafs

        base = self._path(directory)
        selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise self._fail("list", directory, exc) from None
        root = self._path("")
        return sorted(
            info.path[len(root) + 1 :] for info in infos if info.type == pafs.FileType.File
        )

    def listdir(self, directory: str) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in self._list(directory, recursive=False)]

    def parts(self, directory: str = "") -> list[str]:
        return [
            p for p in self._list(directory, recursive=True)
            if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")
        ]  # fmt: skip

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self._path(relative))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._fail("delete", relative, exc) from None

    def dataset_source(self, relatives: list[str]) -> tuple[list[str], pafs.FileSystem | None]:
        return [self._path(r) for r in relatives], self.fs


def archive_root(settings: Settings) -> ArchiveRoot:
    """The configured archive: a directory, or the object store its URL names (one client per
    configuration and process: a retention run writes many files)."""
    url = settings.archive_url
    if url is None:
        return LocalRoot(settings.archive)
    key = (
        url,
        settings.archive_s3_endpoint,
        settings.archive_s3_region,
        settings.archive_s3_access_key_id,
        settings.archive_s3_secret_access_key,
        settings.archive_s3_secret_access_key_block,
        settings.archive_s3_timeout_seconds,
        settings.archive_lock_days,
    )
    found = _S3_ROOTS.get(key)
    if found is None:
        found = _S3_ROOTS[key] = S3Root(url, settings, lock_days=settings.archive_lock_days)
    return found


_S3_ROOTS: dict[tuple[Any, ...], S3Root] = {}


def as_root(root: ArchiveRoot | Path) -> ArchiveRoot:
    return root if isinstance(root, ArchiveRoot) else LocalRoot(Path(root))
