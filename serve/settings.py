"""What the service runs with, and where each value comes from: ``imgpipe.bundle.SERVING``'s
defaults, then the bundle's ``settings.json`` (written by the serve stage, which checked them over
HTTP), then the flags of ``python -m serve``.

    settings = resolve(Path("model"), max_batch=None, api_key_file=Path("keys.txt"))  # None: not given
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from imgpipe.bundle import BUNDLE_SETTINGS, SERVING, SETTINGS
from serve.auth import load_keys
from serve.remote import RemotePolicy


@dataclass(frozen=True)
class Settings:
    """Every default is ``imgpipe.bundle.SERVING``'s."""

    bundle: Path
    max_batch: int = SERVING.max_batch
    max_wait_ms: float = SERVING.max_wait_ms
    max_queue: int = SERVING.max_queue
    max_body_bytes: int = SERVING.max_body_bytes
    max_pixels: int = SERVING.max_pixels
    max_batch_images: int = SERVING.max_batch_images
    remote: RemotePolicy = field(default_factory=RemotePolicy)
    path_root: Path | None = None
    threads: int = SERVING.threads
    workers: int = SERVING.workers
    precision: str = SERVING.precision
    upload_timeout: float = SERVING.upload_timeout
    api_keys: tuple[str, ...] = ()  # empty: no key needed (serve.auth)

    def public(self) -> dict[str, Any]:
        """The settings /metadata shows: no keys, no server paths."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("bundle", "remote", "path_root", "api_keys")}
        return {**shown, "remote_urls": self.remote.enabled, "remote_timeout": self.remote.timeout,
                "paths": self.path_root is not None, "keys_required": bool(self.api_keys)}


class BundleSettings(BaseModel):
    """The bundle's settings.json: only BUNDLE_SETTINGS, each checked as params.yaml checks it."""

    model_config = ConfigDict(extra="forbid")
    max_batch: PositiveInt | None = None
    max_wait_ms: float | None = Field(None, ge=0)
    max_queue: PositiveInt | None = None
    max_body_bytes: PositiveInt | None = None
    max_pixels: PositiveInt | None = None


assert set(BundleSettings.model_fields) == set(BUNDLE_SETTINGS)


def bundle_settings(folder: Path) -> dict[str, Any]:
    """The settings ``folder``'s settings.json holds ({} without one: an older bundle)."""
    path = folder / SETTINGS
    if not path.is_file():
        return {}
    try:
        checked = BundleSettings.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise ValueError(f"{path}: {where}: {first['msg']}") from None
    return checked.model_dump(exclude_none=True)


def resolve(bundle: Path, *, remote: RemotePolicy | None = None, remote_timeout: float | None = None,
            api_key_file: Path | None = None, path_root: Path | None = None, **flags: Any) -> Settings:
    """Defaults, then the bundle's settings, then ``flags`` that are not None. ``remote`` is the
    URL policy without its timeout, which resolves like the other settings. Raises ValueError
    naming the file or flag that is wrong."""
    unknown = set(flags) - {f.name for f in fields(Settings)}
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    values = {**bundle_settings(bundle), **{name: value for name, value in flags.items() if value is not None}}
    policy = remote or RemotePolicy()
    policy = RemotePolicy(policy.enabled, policy.allow, max_bytes=values.get("max_body_bytes", policy.max_bytes),
                          timeout=SERVING.remote_timeout if remote_timeout is None else remote_timeout,
                          max_redirects=policy.max_redirects)
    if path_root is not None and not path_root.is_dir():
        raise ValueError(f"--path-root {path_root}: not a folder")
    keys = load_keys(api_key_file) if api_key_file is not None else ()
    return Settings(bundle=bundle, remote=policy, path_root=path_root, api_keys=keys, **values)

