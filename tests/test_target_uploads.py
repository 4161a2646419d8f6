"""`tufa targets add --file`: the server is asked before anything is uploaded.

A refusal (a wrong or under-scoped token, no factory, a different target under a
published name) comes before any upload and stores nothing; a file the factory already
has is not sent again; the progress shows a total and a speed, never a "?".
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

import pytest

from tests.helpers import Factory, cli_env, create_factory, run_cli, send
from tests.test_ci_publishing import ci_env, target, upload
from tests.test_operations import scrape

ADD = ("targets", "add", "fw-1", "--version", "1", "--hardware-id", "rpi4", "--tag", "main")


def _uploads(factory: Factory) -> float:
    """Blob uploads the server has answered so far, whatever their status."""
    samples = scrape(factory.server)
    return sum(
        count
        for (name, labels), count in samples.items()
        if name == "tufa_http_requests_total" and ("route_class", "blob") in labels
    )


def _stored(factory: Factory, data: bytes) -> bool:
    digest = hashlib.sha256(data).hexdigest()
    return (factory.server.local.data_dir / "blobs" / "sha256" / digest[:2] / digest).exists()


def _image(tmp_path: Path, name: str = "image.img", size: int = 3 << 20) -> Path:
    path = tmp_path / name
    path.write_bytes(secrets.token_bytes(size))
    return path


@pytest.mark.parametrize("token", ["tufa_wrong", "read"])
def test_a_refused_token_uploads_nothing(factory: Factory, tmp_path: Path, token: str) -> None:
    image = _image(tmp_path)
    secret = factory.token("read") if token == "read" else token
    env = cli_env(factory, tmp_path / "config.json") | {"TUFA_TOKEN": secret}
    before = _uploads(factory)
    done = run_cli(*ADD, "--file", str(image), env=env)
    assert done.returncode != 0
    assert "uploading" not in done.stderr, done.stderr
    assert "refused" in done.stderr
    assert _uploads(factory) == before
    assert not _stored(factory, image.read_bytes())


def test_no_factory_uploads_nothing(factory: Factory, tmp_path: Path) -> None:
    image = _image(tmp_path)
    env = cli_env(factory, tmp_path / "config.json") | {"TUFA_TOKEN": factory.token("ci")}
    before = _uploads(factory)
    done = run_cli(*ADD, "--file", str(image), env={**env, "TUFA_FACTORY": ""})
    assert done.returncode != 0
    assert "factory" in done.stderr.lower(), done.stderr
    assert "uploading" not in done.stderr, done.stderr
    assert _uploads(factory) == before


def test_an_identical_target_is_not_uploaded_again(factory: Factory, tmp_path: Path) -> None:
    image = _image(tmp_path)
    env = ci_env(factory, tmp_path)
    first = run_cli(*ADD, "--file", str(image), env=env)
    assert first.returncode == 0, first.stderr
    assert "Published fw-1." in first.stdout
    before = _uploads(factory)
    again = run_cli(*ADD, "--file", str(image), env=env)
    assert again.returncode == 0, again.stderr
    assert "already published, identical: nothing to do" in again.stdout
    assert "uploading" not in again.stderr
    assert _uploads(factory) == before


def test_a_conflicting_target_stores_no_file(factory: Factory, tmp_path: Path) -> None:
    env = ci_env(factory, tmp_path)
    published = run_cli(*ADD, "--file", str(_image(tmp_path, "one.img")), env=env)
    assert published.returncode == 0, published.stderr
    other = _image(tmp_path, "other.img")
    refused = run_cli(*ADD, "--file", str(other), env=env)
    assert refused.returncode != 0
    assert "a different target named 'fw-1' was already published" in refused.stderr
    assert "uploading" not in refused.stderr
    assert not _stored(factory, other.read_bytes())


def test_several_files_show_a_total_and_a_speed(factory: Factory, tmp_path: Path) -> None:
    batch = tmp_path / "batch.json"
    files = [_image(tmp_path, f"part-{i}.img", 1 << 20) for i in range(3)]
    entries = [
        f'{{"name": "part-{i}", "version": "1", "hardware_ids": ["rpi4"], '
        f'"tags": ["main"], "file": "{path.name}"}}'
        for i, path in enumerate(files)
    ]
    batch.write_text("[" + ", ".join(entries) + "]")
    # A terminal of a fixed width, as rich sees one: the bars are drawn, frame by frame.
    env = ci_env(factory, tmp_path) | {"TTY_COMPATIBLE": "1", "COLUMNS": "120", "NO_COLOR": "1"}
    done = run_cli("targets", "add", "--batch", str(batch), env=env)
    assert done.returncode == 0, done.stderr
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", done.stderr)
    last_frame = [line.strip() for line in drawn.splitlines() if line.strip()][-4:]
    assert last_frame[0].startswith("total, 3 files"), last_frame
    assert "3.1/3.1 MB" in last_frame[0], last_frame
    for line in last_frame:
        assert re.search(r" [0-9.]+ [kMG]?B/s$", line), line


def test_a_check_takes_as_large_a_body_as_a_publish(factory: Factory) -> None:
    """`targets add` checks the whole publish first: a check of 5,000 targets (over the
    1 MiB of most requests) is answered, as their publish would be."""
    many = [
        {
            "name": f"big-{i}",
            "version": "1",
            "hardware_ids": ["rpi4"],
            "tags": ["main"],
            "sha256": "ab" * 32,
            "length": 1,
            "url": f"https://cdn.example/{'x' * 200}/{i}",
        }
        for i in range(5000)
    ]
    response = send(
        factory.server,
        "POST",
        factory.path("/targets/check"),
        factory.token("ci"),
        json={"targets": many},
    )
    assert len(response.request.content) > 1 << 20
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["added"]) == 5000


def test_a_check_tells_nothing_of_another_factorys_files(factory: Factory) -> None:
    """ADR 0010: a file another factory uploaded is as missing to this one as a file
    nobody has; the check answers both alike, and the other factory's own answer is
    unaffected."""
    other = create_factory(factory.server)
    theirs, nobodys = secrets.token_bytes(4096), secrets.token_bytes(4096)
    their_digest = upload(other, theirs)

    def check(owner: Factory, data: bytes) -> dict[str, object]:
        spec = target("probe", data, version="1")
        response = send(
            owner.server,
            "POST",
            owner.path("/targets/check"),
            owner.admin_token,
            json={"targets": [spec]},
        )
        assert response.status_code == 200, response.text
        answer: dict[str, object] = response.json()
        return answer

    probed, unknown = check(factory, theirs), check(factory, nobodys)
    assert probed == {"added": ["probe"], "unchanged": [], "missing_uploads": [their_digest]}
    assert unknown == {**probed, "missing_uploads": [hashlib.sha256(nobodys).hexdigest()]}
    assert check(other, theirs)["missing_uploads"] == []
