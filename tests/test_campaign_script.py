"""The real-data campaign script (`results/ai4mars64/campaign.sh`) after its state folder is
lost: the committed stages stay done and only the first uncommitted one restarts, instead of
hours of finished search starting again from nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "results" / "ai4mars64" / "campaign.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the script is bash")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout's results as the campaign commits them: two stages done, one search's pick."""
    results = tmp_path / "repo" / "results" / "ai4mars64"
    (results / "campaign").mkdir(parents=True)
    shutil.copy(SCRIPT, results / "campaign.sh")
    for stage in ("search-any", "export-any"):
        (results / "campaign" / stage).write_text(f"finished {stage}\n")
    (results / "search-any" / "plots").mkdir(parents=True)
    (results / "search-any" / "best_config.yaml").write_text("committed pick\n")
    (results / "search-any" / "plots" / "history.png").write_bytes(b"png")
    return tmp_path / "repo"


def restore(repo: Path, campaign: Path) -> str:
    env = {**os.environ, "MARSSEG_CAMPAIGN": str(campaign)}
    script = repo / "results" / "ai4mars64" / "campaign.sh"
    done = subprocess.run(["bash", str(script), "restore"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_lost_state_folder_keeps_the_committed_stages_and_picks(repo, tmp_path):
    campaign = tmp_path / "campaign"
    said = restore(repo, campaign)

    assert sorted(p.name for p in (campaign / "done").iterdir()) == ["export-any", "search-any"]
    assert (campaign / "done" / "search-any").read_text() == "finished search-any\n"
    pick = campaign / "results" / "search-any"
    assert (pick / "best_config.yaml").read_text() == "committed pick\n"
    assert (pick / "plots" / "history.png").exists()
    assert not (campaign / "results" / "search-budget").exists()  # nothing committed, nothing made
    assert "search-any counted done" in said and "results/search-any restored" in said


def test_a_state_folder_that_is_there_is_never_overwritten(repo, tmp_path):
    campaign = tmp_path / "campaign"
    (campaign / "done").mkdir(parents=True)
    (campaign / "done" / "search-any").write_text("finished here\n")
    (campaign / "results" / "search-any").mkdir(parents=True)
    (campaign / "results" / "search-any" / "best_config.yaml").write_text("exported here\n")

    said = restore(repo, campaign)

    assert (campaign / "done" / "search-any").read_text() == "finished here\n"
    assert (campaign / "done" / "export-any").exists()  # the one the folder lacked
    pick = campaign / "results" / "search-any"
    assert (pick / "best_config.yaml").read_text() == "exported here\n"
    assert not (pick / "plots").exists()
    assert "search-any counted done" not in said
