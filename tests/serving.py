"""What the service's tests share: the error shape, an upload, a bundle replaced as `dvc pull`
replaces it, and clients that keep the service busy."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx

from tests import images


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def image_file(seed: int = 0) -> dict:
    return {"image": ("x.png", images.rgb_png(seed), "image/png")}


def copy_bundle(source: Path, target: Path) -> None:
    """Replace ``target``'s files with ``source``'s, each by an atomic rename (as a pull would)."""
    target.mkdir(exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copyfile(path, target / f".{path.name}.tmp")
            os.replace(target / f".{path.name}.tmp", target / path.name)


class Load:
    """Clients sending /predict in a loop until stopped; every answer that is not a 200 is kept."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url, self.stop = url, threading.Event()
        self.answered, self.failures, self.versions = 0, [], set()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/predict", files=image_file(seed))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                    continue
                self.answered += 1
                self.versions.add(response.json()["model"]["version"])

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
