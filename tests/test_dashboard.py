"""tlsearch.dashboard: the study's note, and optuna-dashboard served locally and seen in Chromium.

The browser test needs Chromium (Debian: ``apt-get install chromium``). Without it the test skips,
except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from conftest import TINY, start_cli, tiny_study

from tlsearch.config import config_from_dict
from tlsearch.dashboard import DashboardServer, write_study_note
from tlsearch.errors import TlsearchError
from tlsearch.storage import load_study_config

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Let the page's scripts fetch the study from the API before the DOM is dumped.
    "--virtual-time-budget=15000",
]


def _empty_study(tmp_path: Path) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'note.db'}"
    study = optuna.create_study(storage=url, study_name="tiny", direction="maximize")
    return url, study


def test_note_describes_the_study_and_is_written_once(tmp_path: Path) -> None:
    _, study = _empty_study(tmp_path)
    cfg = config_from_dict(TINY)
    assert write_study_note(study, cfg, "sklearn 8x8 digits: clean → noisy")
    note = optuna_dashboard.get_note(study)
    assert note.startswith("## tlsearch study `tiny`\n")
    for line in [
        "- **Data**: task `digits-noisy` (sklearn 8x8 digits: clean → noisy); 10 labelled target "
        "images per class, data seed 0",
        "- **Model**: MLP, hidden sizes [32, 16]; pretrained on the source for 5 epochs "
        "(lr 0.01), then fine-tuned for 5 epochs with adam",
        "- **Search space**: λ 0.0001 … 1, log scale; lr 0.001 … 0.03, log scale; "
        "frozen_blocks 0 … 2; backbone_lr_mult 0.1 (fixed)",
        "- **CV scheme**: 2-fold stratified cross-validation on the target training split "
        "(seed 0); a trial's value (`cv_accuracy_then_loss`) is the mean fold accuracy, ties "
        "broken by the mean fold loss; its intermediate value at step i is that of folds 0 … i",
    ]:
        assert line in note.splitlines()
    (search,) = [ln for ln in note.splitlines() if ln.startswith("- **Search**")]
    assert search.startswith("- **Search**: sampler `random`, pruner `none`, 3 trials")
    assert search.endswith(f"the export's rule: `{cfg.select.rule}`")
    assert "**Regularizer**: `l2sp`" in note

    # Resuming writes nothing new: optuna-dashboard keeps every version of a note.
    versions = dict(study._storage.get_study_system_attrs(study._study_id))
    assert not write_study_note(study, cfg, "sklearn 8x8 digits: clean → noisy")
    assert dict(study._storage.get_study_system_attrs(study._study_id)) == versions


def test_server_listens_on_loopback_and_serves_the_api(tmp_path: Path) -> None:
    url, _ = _empty_study(tmp_path)
    server = DashboardServer(url, port=0)
    assert server.host == "127.0.0.1" and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/"
    assert server.study_urls() == {"tiny": f"{server.url}dashboard/studies/1"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"{server.url}api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
    finally:
        server.httpd.shutdown()
        thread.join(timeout=30)


def test_a_taken_port_is_one_clear_error(tmp_path: Path) -> None:
    url, _ = _empty_study(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TlsearchError, match=f"dashboard: cannot listen on 127.0.0.1:{port}"):
            DashboardServer(url, port=port)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _browse(chromium: str, url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _dom(chromium: str, url: str, expected: str) -> str:
    """The page's DOM once it holds ``expected`` (a slow machine may need a second load)."""
    for _ in range(3):
        dom = _browse(chromium, url, "--dump-dom")
        if expected in dom:
            break
    return dom


@pytest.mark.slow
def test_dashboard_page_in_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    study, url = tiny_study(tmp_path)
    write_study_note(study, load_study_config(study), study.user_attrs.get("task"))

    server = start_cli("dashboard", "--storage", url, "--port", "0", cwd=tmp_path)
    try:
        first = server.stdout.readline()
        assert first.startswith(f"optuna-dashboard for {url} at http://127.0.0.1:"), (
            first + server.stderr.read() if server.poll() is not None else first
        )
        page = server.stdout.readline().split("'tiny': ")[1].strip()
        assert page.startswith("http://127.0.0.1:") and page.endswith("/dashboard/studies/1")

        dom = _dom(chromium, page, "trial #3")
        assert "tiny" in dom
        for number in range(4):
            assert f"trial #{number}" in dom  # the intermediate-value plot lists every trial
        assert "Best Trial" in dom

        note = _dom(chromium, f"{page}/note", "CV scheme")
        assert "tlsearch study" in note and "CV scheme" in note and "Search space" in note

        shot = tmp_path / "dashboard.png"
        _browse(chromium, page, "--window-size=1400,2200", f"--screenshot={shot}")
        assert shot.read_bytes().startswith(b"\x89PNG")
    finally:
        server.terminate()
        server.wait(timeout=30)
