"""`FsspecStorage`: checkpoint files on object storage (`s3://`, `gs://`, `memory://`...) through fsspec.

Object stores have no rename, so a checkpoint file is committed by a manifest instead:

1. The safetensors bytes are uploaded in one object (one PUT, or a multipart upload that becomes
   visible only when complete): under the file's own name `X.safetensors` when no committed manifest
   names that object, else (replacing a committed file) under a unique data name
   `X.safetensors.<32 hex>.data`, so the committed bytes are never overwritten in place.
2. Then the manifest `X.safetensors.manifest.json` (strict JSON: format, format version, the data
   object's name, size and sha256) is written in one PUT: that write is the commit. Where the store
   has conditional writes (S3 through s3fs), it is a compare-and-swap: `If-None-Match: *` when there
   was no manifest, `If-Match: <ETag>` of the manifest read before the upload otherwise, so a
   writer that raced another fails (`CheckpointWriteError`) instead of silently replacing its commit.
3. Only then is the data object the old manifest named removed (if it is not the one just written),
   and the paths the save made stale.

A reader reads the manifest first and ignores a checkpoint without one (`FileNotFoundError`: an
upload that was never committed); it checks the data object's size against the manifest, the
header length field from a ranged read of the first 8 bytes (`reader.MAX_HEADER_BYTES`), then
downloads the bytes and checks their size and sha256 (always: hashing costs far less than the
download) before `safetensors.torch.load` parses them from memory. Nothing is unpickled.

`keep_previous_as` (BackupAndRestore's `double_checkpoint`): the committed file is first copied (a
server-side copy) to the previous name and that copy committed by its own manifest, so the previous
file stays committed while the new latest is uploaded.

Removing a file removes its manifest first (the file is no longer committed), then its data object.
Before each upload, leftovers in the file's directory are removed: unique data objects
(`<name>.<32 hex>.data`) that their manifest does not name, and plain objects without a manifest that
`owns(url)` says are ours (a `ModelCheckpoint` passes its filepath template). Nothing else is touched.

Sharded (FSDP2) directories are not supported on remote storage: those keep a clear refusal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchcallbacks.checkpoint.errors import CheckpointError, CheckpointWriteError
from torchcallbacks.checkpoint.reader import HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, loads_strict

#: The suffix of a manifest: `X.safetensors` is committed by `X.safetensors.manifest.json`.
MANIFEST_SUFFIX = ".manifest.json"
#: The manifest's `format` field and version.
MANIFEST_FORMAT = "torchcallbacks.manifest"
MANIFEST_VERSION = 1
#: The largest manifest a reader parses (a manifest is a few hundred bytes).
MAX_MANIFEST_BYTES = 64 * 1024

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_NAME = re.compile(r"^(?P<base>.+)\.(?P<token>[0-9a-f]{32})\.data$")

#: The extra to install for each protocol whose backend is not part of fsspec.
_EXTRAS = {"s3": "s3", "s3a": "s3"}


def url_scheme(path: Any) -> str | None:
    """The scheme of a URL path (`"s3"` for `s3://bucket/x`), None for a plain path or `file://`.

    Args:
        path: a path or URL (str or `os.PathLike`).

    Example:

    ```python
    url_scheme("s3://bucket/m.safetensors")  # 's3'
    url_scheme("ckpt/m.safetensors")         # None
    ```
    """
    match = _URL.match(str(path))
    if match is None or match.group(1).lower() == "file":
        return None
    return match.group(1).lower()


def missing_backend_error(url: str, name: str, cause: BaseException | None = None) -> ImportError:
    """The ImportError for a URL whose fsspec backend (or fsspec itself) is not installed, naming the
    extra to install.

    Args:
        url: the URL given.
        name: the argument it came from, for the message.
        cause: the ImportError fsspec raised, if any.

    Example:

    ```python
    raise missing_backend_error("s3://bucket/m.safetensors", "save_weights: filepath")
    ```
    """
    scheme = url_scheme(url) or "?"
    extra = _EXTRAS.get(scheme)
    how = (f"pip install torchcallbacks[{extra}]" if extra is not None
           else f"pip install fsspec and the fsspec backend of {scheme!r}")
    detail = f" ({cause})" if cause is not None else ""
    return ImportError(f"{name}: {url!r} needs fsspec and its {scheme!r} backend, which are not installed: {how}{detail}")


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_while(data: bytes | memoryview, upload: Callable[[], Any]) -> str:
    """`_sha256(data)` on a thread of its own while `upload()` runs here (hashlib lets go of the GIL
    for large data, and the upload mostly waits): the hash adds next to nothing to the save's time."""
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(_sha256(data)), name="torchcallbacks-sha256")
    thread.start()
    try:
        upload()
    finally:
        thread.join()
    return result[0]


class FsspecStorage:
    """Checkpoint files on an fsspec file system, committed by manifests (see the module docstring).

    Paths are the URLs the user gave (`s3://bucket/ckpt/m.safetensors`); the file system is built once
    from the first one and its `storage_options`.

    Args:
        url: a URL on the file system (any path on it: only its protocol and options are used).
        storage_options: passed to fsspec (`endpoint_url` in `client_kwargs`, `key`, `secret`...);
            fsspec's own configuration (environment variables) applies too.
        name: the argument the URL came from, for messages.

    Raises:
        ImportError: fsspec or the protocol's backend is not installed (the message names the extra).

    Attributes:
        owns: a function of a URL saying whether a plain object without a manifest is ours to remove
            (a leftover of an interrupted upload), or None: only unique data objects are removed.

    Example:

    ```python
    storage = FsspecStorage("memory://ckpt")
    storage.write_file("memory://ckpt/w.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
    tensors, metadata = storage.read_file("memory://ckpt/w.safetensors")
    ```
    """

    #: Checkpoints here are committed by manifests (see the module docstring).
    remote = True

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *, name: str = "path") -> None:
        try:
            from fsspec.core import url_to_fs
        except ImportError as exc:
            raise missing_backend_error(url, name, exc) from exc
        try:
            self.fs, _ = url_to_fs(url, **dict(storage_options or {}))
        except ImportError as exc:
            raise missing_backend_error(url, name, exc) from exc
        self.scheme = url_scheme(url) or ""
        self.owns: Callable[[str], bool] | None = None
        # conditional writes (If-None-Match / If-Match on PUT): s3fs passes them to put_object
        self.conditional_writes = type(self.fs).__module__.startswith("s3fs")

    # -- names -------------------------------------------------------------------------------------
    def _key(self, url: Any) -> str:
        """The file system's path of a URL (no protocol)."""
        return str(self.fs._strip_protocol(str(url)))

    @staticmethod
    def manifest_url(url: str) -> str:
        """The manifest of the file `url`.

        Args:
            url: the checkpoint file.

        Example:

        ```python
        FsspecStorage.manifest_url("s3://b/m.safetensors")  # 's3://b/m.safetensors.manifest.json'
        ```
        """
        return f"{url}{MANIFEST_SUFFIX}"

    # -- manifests ---------------------------------------------------------------------------------
    def read_manifest(self, url: str) -> dict[str, Any] | None:
        """The manifest of the file `url`, checked, or None when there is none (not committed).

        Args:
            url: the checkpoint file.

        Raises:
            CheckpointError: a manifest that is not strict JSON of this format.

        Example:

        ```python
        manifest = storage.read_manifest("s3://b/backup/latest.safetensors")
        manifest["objects"][0]["size"]
        ```
        """
        key = self._key(self.manifest_url(url))
        try:
            size = self.fs.size(key)
            if size is not None and size > MAX_MANIFEST_BYTES:
                raise CheckpointError(f"{self.manifest_url(url)!r}: {size} bytes, more than a manifest has")
            raw = self.fs.cat_file(key)
        except FileNotFoundError:
            return None
        where = repr(self.manifest_url(url))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{where} is not a manifest (not UTF-8)") from exc
        manifest = loads_strict(text, where)
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{where} is not a torchcallbacks manifest")
        version = manifest.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
            raise CheckpointError(f"{where}: format_version {version!r}; this torchcallbacks reads 1 to {MANIFEST_VERSION}")
        objects = manifest.get("objects")
        if not (isinstance(objects, list) and len(objects) == 1 and isinstance(objects[0], dict)):
            raise CheckpointError(f"{where}: 'objects' must be a list of one data object")
        entry = objects[0]
        data = entry.get("name")
        base = posixpath.basename(self._key(url))
        if not isinstance(data, str) or not (data == base or (_DATA_NAME.match(data) and data.startswith(base + "."))):
            raise CheckpointError(f"{where}: data object {data!r} is not a name of this file's")
        size = entry.get("size")
        sha = entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CheckpointError(f"{where}: 'size' must be an integer >= 0, found {size!r}")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise CheckpointError(f"{where}: 'sha256' must be 64 hex digits, found {sha!r}")
        return manifest

    def _manifest_etag(self, url: str) -> str | None:
        try:
            info = self.fs.info(self._key(self.manifest_url(url)))
        except FileNotFoundError:
            return None
        etag = info.get("ETag")
        return etag if isinstance(etag, str) else None

    def _write_manifest(self, url: str, data_key: str, size: int, sha: str, previous_etag: str | None,
                        had_manifest: bool) -> None:
        """Commit `url`: write its manifest, with a compare-and-swap where the store has one."""
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "objects": [{"name": posixpath.basename(data_key), "size": size, "sha256": sha}],
        }
        body = json.dumps(manifest, allow_nan=False, sort_keys=True).encode()
        key = self._key(self.manifest_url(url))
        try:
            if self.conditional_writes and not had_manifest:
                self.fs.pipe_file(key, body, mode="create")  # If-None-Match: *
            elif self.conditional_writes and previous_etag is not None:
                self.fs.pipe_file(key, body, IfMatch=previous_etag)
            else:
                self.fs.pipe_file(key, body)
        except FileExistsError as exc:
            raise CheckpointWriteError(17, "another writer committed this checkpoint meanwhile; not replaced", url) from exc
        except OSError as exc:
            if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
                raise CheckpointWriteError(
                    17, "another writer replaced this checkpoint's manifest meanwhile; not replaced", url) from exc
            raise

    # -- files -------------------------------------------------------------------------------------
    def write_file(
        self,
        path: Any,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        keep_previous_as: Any = None,
    ) -> None:
        """Upload the safetensors file `path` and commit it with its manifest (module docstring).

        Args:
            path: the file's URL.
            tensors: name -> contiguous tensor, no two sharing memory.
            metadata: the header metadata.
            keep_previous_as: the committed file at `path`, if any, is first copied (and committed) here.

        Raises:
            CheckpointWriteError: another writer committed `path` meanwhile (conditional writes).

        Example:

        ```python
        storage.write_file("s3://b/m.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
        ```
        """
        from safetensors.torch import save

        from torchcallbacks.checkpoint.writer import _save_file

        url = str(path)
        data = _serialize(save, _save_file, dict(tensors), dict(metadata) if metadata is not None else None)
        self._sweep(url)
        if keep_previous_as is not None:
            self._copy_committed(url, str(keep_previous_as))
        etag = self._manifest_etag(url) if self.conditional_writes else None
        old = self.read_manifest_or_none(url)
        key = self._key(url)
        old_data = None if old is None else posixpath.join(posixpath.dirname(key), old["objects"][0]["name"])
        data_key = key if old_data != key else f"{key}.{uuid.uuid4().hex}.data"
        digest = _hash_while(data, lambda: self.fs.pipe_file(data_key, data))  # the hash overlaps the upload
        self._write_manifest(url, data_key, len(data), digest, etag, old is not None)
        if old_data is not None and old_data != data_key:
            self._rm(old_data)

    def read_manifest_or_none(self, url: str) -> dict[str, Any] | None:
        """`read_manifest`, with a damaged manifest taken as none (the writer replaces it).

        Args:
            url: the checkpoint file.

        Example:

        ```python
        storage.read_manifest_or_none("memory://ckpt/m.safetensors")
        ```
        """
        try:
            return self.read_manifest(url)
        except CheckpointError:
            return None

    def _copy_committed(self, url: str, previous: str) -> None:
        """Copy the committed file `url` to `previous` and commit the copy (nothing if `url` has none,
        or its data does not have the size its manifest says)."""
        manifest = self.read_manifest_or_none(url)
        if manifest is None:
            return
        entry = manifest["objects"][0]
        source = posixpath.join(posixpath.dirname(self._key(url)), entry["name"])
        try:
            whole = self.fs.size(source) == entry["size"]
        except FileNotFoundError:
            whole = False
        if not whole:  # a damaged latest never replaces a committed previous
            return
        etag = self._manifest_etag(previous) if self.conditional_writes else None
        old = self.read_manifest_or_none(previous)
        key = self._key(previous)
        old_data = None if old is None else posixpath.join(posixpath.dirname(key), old["objects"][0]["name"])
        target = key if old_data != key else f"{key}.{uuid.uuid4().hex}.data"
        self.fs.copy(source, target)
        if self.fs.size(target) != entry["size"]:
            raise CheckpointWriteError(5, "the copy of the previous checkpoint is not complete", previous)
        self._write_manifest(previous, target, entry["size"], entry["sha256"], etag, old is not None)
        if old_data is not None and old_data != target:
            self._rm(old_data)

    def _rm(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(key)

    def _sweep(self, url: str) -> None:
        """Remove leftovers of interrupted uploads in `url`'s directory: unique data objects their
        manifest does not name, and plain objects without a manifest that `owns` says are ours."""
        parent = posixpath.dirname(self._key(url))
        url_dir = url.rsplit("/", 1)[0]  # the URL of `parent`, as the user spelled it
        try:
            self.fs.invalidate_cache(parent)
            names = [posixpath.basename(str(p).rstrip("/")) for p in self.fs.ls(parent, detail=False)]
        except FileNotFoundError:
            return
        present = set(names)
        named: dict[str, str | None] = {}

        def committed_data(base: str) -> str | None:
            if base not in named:
                manifest = None
                if base + MANIFEST_SUFFIX in present:
                    manifest = self.read_manifest_or_none(f"{url_dir}/{base}")
                named[base] = None if manifest is None else manifest["objects"][0]["name"]
            return named[base]

        for name in names:
            match = _DATA_NAME.match(name)
            if match is not None:
                if committed_data(match.group("base")) != name:
                    self._rm(posixpath.join(parent, name))
            elif (not name.endswith(MANIFEST_SUFFIX) and self.owns is not None
                  and self.owns(f"{url_dir}/{name}") and committed_data(name) != name):
                self._rm(posixpath.join(parent, name))

    def remove_file(self, path: Any) -> None:
        """Remove the file `path`: its manifest first (no longer committed), then its data object.

        Args:
            path: the file's URL.

        Example:

        ```python
        storage.remove_file("s3://b/ckpt/m-01.safetensors")
        ```
        """
        url = str(path)
        manifest = self.read_manifest_or_none(url)
        self._rm(self._key(self.manifest_url(url)))
        if manifest is not None:
            self._rm(posixpath.join(posixpath.dirname(self._key(url)), manifest["objects"][0]["name"]))

    def remove(self, path: Any) -> None:
        """Remove a checkpoint file of ours (`remove_file`); nothing if there is none.

        Args:
            path: the file's URL.

        Example:

        ```python
        storage.remove("s3://b/backup/previous.safetensors")
        ```
        """
        self.remove_file(path)

    def has_file(self, path: Any) -> bool:
        """Whether the file `path` is committed (it has a manifest).

        Args:
            path: the file's URL.

        Example:

        ```python
        storage.has_file("s3://b/backup/latest.safetensors")
        ```
        """
        return self.fs.exists(self._key(self.manifest_url(str(path))))

    def has_directory(self, directory: str) -> bool:
        """Sharded directories are not written to remote storage: always False.

        Args:
            directory: the directory's URL.

        Example:

        ```python
        storage.has_directory("s3://b/backup/latest")  # False
        ```
        """
        return False

    def check_writable(self, directory: str, name: str) -> None:
        """Write and remove a probe object under `directory`, so that missing credentials, a missing
        bucket or a read-only store fail before training (an OSError naming the argument).

        Args:
            directory: the URL of the directory the checkpoints go to.
            name: the argument it came from, for the message.

        Example:

        ```python
        storage.check_writable("s3://b/ckpt", "ModelCheckpoint: filepath")
        ```
        """
        probe = posixpath.join(self._key(directory), f".torchcallbacks-probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"")
            self._rm(probe)
        except Exception as exc:
            raise OSError(f"{name}: cannot write to {directory!r} ({type(exc).__name__}: {exc})") from exc

    # -- reading -----------------------------------------------------------------------------------
    def read_bytes(self, path: Any) -> bytes:
        """The committed bytes of the file `path`, checked against its manifest (size, header length
        field from a ranged read of the first 8 bytes, then sha256 of the whole download).

        Args:
            path: the file's URL.

        Raises:
            FileNotFoundError: no committed file (no manifest; data alone is an uncommitted upload).
            CheckpointError: a damaged manifest, or data that does not match it.

        Example:

        ```python
        data = storage.read_bytes("s3://b/m.safetensors")
        ```
        """
        url = str(path)
        manifest = self.read_manifest(url)
        if manifest is None:
            extra = " (an upload that was never committed is there)" if self.fs.exists(self._key(url)) else ""
            raise FileNotFoundError(f"checkpoint file {url!r} does not exist: no manifest {self.manifest_url(url)!r}{extra}")
        entry = manifest["objects"][0]
        key = posixpath.join(posixpath.dirname(self._key(url)), entry["name"])
        try:
            size = self.fs.size(key)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{url!r}: its manifest names {entry['name']!r}, which is not there") from exc
        if size != entry["size"]:
            raise CheckpointError(f"{url!r}: the data object has {size} bytes, its manifest says {entry['size']}")
        if size < HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{url!r} is not a readable safetensors file: it has {size} bytes")
        prefix = bytes(self.fs.cat_file(key, start=0, end=HEADER_LENGTH_BYTES))[:HEADER_LENGTH_BYTES]  # a server may send more
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{url!r}: a ranged read of its first {HEADER_LENGTH_BYTES} bytes returned {len(prefix)}")
        header_size = int.from_bytes(prefix, "little")
        if header_size > MAX_HEADER_BYTES or header_size > size - HEADER_LENGTH_BYTES:
            raise CheckpointError(
                f"{url!r} is not a readable safetensors file: its header length field says {header_size} bytes "
                f"(limit {MAX_HEADER_BYTES}, {size - HEADER_LENGTH_BYTES} follow)"
            )
        data = bytes(self.fs.cat_file(key))
        if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
            raise CheckpointError(f"{url!r}: the data downloaded does not match its manifest (size or sha256)")
        return data

    def read_file(self, path: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """All tensors (CPU) and the header metadata of the committed file `path`, tied names restored
        (as `tensor_files.read_file` for a local file).

        Args:
            path: the file's URL.

        Raises:
            FileNotFoundError: no committed file.
            CheckpointError: damaged, or not a safetensors file.

        Example:

        ```python
        tensors, metadata = storage.read_file("s3://b/m.safetensors")
        ```
        """
        from safetensors.torch import load

        from torchcallbacks.checkpoint.tensor_files import restore_aliases

        url = str(path)
        data = self.read_bytes(url)
        header_size = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
        try:
            header = loads_strict(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + header_size].decode("utf-8"), f"{url!r}: header")
            tensors = load(data)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{url!r} is not a readable safetensors file (damaged or another format): {exc}") from exc
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        restore_aliases(url, metadata, tensors)
        return tensors, metadata


def _serialize(save: Callable[..., bytes], save_file: Callable[..., None], tensors: dict[str, torch.Tensor],
               metadata: dict[str, str] | None) -> bytes:
    """The safetensors bytes of `tensors` (a dtype safetensors cannot store: the TypeError naming the
    tensor that `writer._save_file` raises)."""
    try:
        return save(tensors, metadata=metadata)
    except KeyError as exc:
        dtype = exc.args[0] if exc.args else None
        names = [name for name, tensor in tensors.items() if tensor.dtype == dtype]
        if not isinstance(dtype, torch.dtype) or not names:
            raise
        raise TypeError(f"tensor {names[0]!r}: dtype {dtype} cannot be stored in safetensors") from exc


def storage_for(path: Any, storage_options: Mapping[str, Any] | None, name: str) -> tuple[str, Any]:
    """The path as a string and the storage it is on: `storage.LOCAL` for a plain path (a `file://`
    URL becomes its path), an `FsspecStorage` for a URL with another scheme.

    Args:
        path: a path or URL.
        storage_options: fsspec options for a URL (refused with a plain path).
        name: the argument it came from, for messages.

    Raises:
        ImportError: the URL's fsspec backend is not installed (the message names the extra).
        ValueError: `storage_options` given with a plain path.

    Example:

    ```python
    path, storage = storage_for("s3://b/m.safetensors", {"anon": False}, "save_weights: filepath")
    ```
    """
    from torchcallbacks.checkpoint.storage import LOCAL
    from torchcallbacks.checks import check_path

    text = check_path(path, name)
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise TypeError(f"{name}: storage_options must be a dict, received {type(storage_options).__name__}")
    if url_scheme(text) is None:
        if storage_options:
            raise ValueError(f"{name}: storage_options apply to URLs (s3://...), not to the local path {text!r}")
        return text, LOCAL
    return text, FsspecStorage(text, storage_options, name=name)
