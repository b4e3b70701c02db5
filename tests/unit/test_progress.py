"""Progress of a run: a live bar on a terminal, log lines in batch jobs."""

from __future__ import annotations

import io
import logging

from maxwellhub.run.output import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_bar_on_a_terminal_ends_with_a_newline():
    """On a TTY the bar is redrawn in place (carriage returns) and ends on a new line at
    the last step, with steps, steps/s and time left; no log line."""
    out = _Terminal()
    logger = logging.getLogger("test_progress_tty")
    progress = Progress(50, stream=out, logger=logger)
    assert progress.live
    for _ in range(50):
        progress.tick()
    text = out.getvalue()
    assert text.startswith("\r[") and text.endswith("\x1b[K\n")
    assert "step 50/50 (100%)" in text and "steps/s" in text and "s left" in text
    assert "#" * 30 in text


def test_batch_job_logs_lines(caplog):
    """Without a TTY (a batch job), progress goes to the log as lines, nothing to stdout."""
    out = io.StringIO()
    progress = Progress(5, every=0.0, stream=out)
    assert not progress.live
    with caplog.at_level(logging.INFO, logger="maxwellhub.run"):
        for _ in range(5):
            progress.tick()
    assert out.getvalue() == ""
    assert "step 5/5 (100%)" in caplog.text


def test_no_bar_off_rank_zero_or_when_asked(monkeypatch):
    """bar=False (MPI ranks other than 0) or MAXWELLHUB_NO_BAR=1 keeps the log lines."""
    assert not Progress(5, stream=_Terminal(), bar=False).live
    monkeypatch.setenv("MAXWELLHUB_NO_BAR", "1")
    assert not Progress(5, stream=_Terminal()).live
