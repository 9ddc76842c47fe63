"""What tracking adds to rank gating (``hvdkit._rank``, re-exported here): the stand-in writer of
the ranks that do not write, and the order in which ranks leave on a stop signal.

Only rank 0 talks to MLflow (and prints summaries); every other rank gets a stand-in with the
same interface. Callers therefore never branch on the rank nor test for None, and collectives
(which must run on every rank) stay outside whatever is gated.
"""

from __future__ import annotations

from hvdkit._rank import from_rank_zero, rank_zero, rank_zero_only

__all__ = ["PEER_EXIT_DELAY_S", "NullWriter", "from_rank_zero", "rank_zero", "rank_zero_only", "stagger_peer_exit"]


# How long a rank other than 0 lingers after a stop signal before it exits.
PEER_EXIT_DELAY_S = 0.5


def stagger_peer_exit(rank: int) -> None:
    """On a stop signal, let rank 0 leave first.

    horovodrun stops a job by SIGTERMing every rank at once. A peer that exits at once breaks
    the collective rank 0 is blocked in, and rank 0 then sees "a peer failed" a few ms before its
    own SIGTERM, recording FAILED for a Ctrl-C. Half a second is far inside horovodrun's 5 s
    grace and enough for rank 0 to act on its own signal; rank 0 itself never waits.
    """
    if rank != 0:
        import time

        time.sleep(PEER_EXIT_DELAY_S)


class NullWriter:
    """What non-zero ranks get instead of a SpoolWriter."""

    tracking_uri = ""
    spool = None
    healthy = False

    def submit(self, event: object) -> None:
        pass

    def wait_for_run(self, ref: str, timeout: float) -> None:
        return None

    def close(self, timeout: float = 0.0) -> None:
        return None
