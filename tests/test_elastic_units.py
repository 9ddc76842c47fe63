"""Pure logic of elastic jobs, next to the real jobs of tests/test_elastic.py: the hostfile hvdkit
watches, the host order ranks follow, the membership bookkeeping."""

from __future__ import annotations

import pytest

from hvdkit import launch
from hvdkit.errors import LaunchError
from hvdkit.tracking._membership import Worker, decode_workers, encode_worker, initial_record, plan_change


@pytest.mark.job
def test_hostfile_discovery_reads_the_file_each_time(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the cluster\nnode1 slots=2\nnode2\n\nnode3:4\nnode4  slots = 3  # spare\n")
    command = launch.hostfile_discovery_command(str(hostfile))
    assert launch.discover(command) == [("node1", 2), ("node2", 1), ("node3", 4), ("node4", 3)]
    hostfile.write_text("node2 slots=1\n")  # edited while the job runs: the next look sees it
    assert launch.discover(command) == [("node2", 1)]
    hostfile.unlink()  # gone: no host available (Horovod waits), not an error
    assert launch.discover(command) == []


@pytest.mark.job
def test_discovery_output_is_checked(tmp_path):
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho 'node1:two'\n")
    script.chmod(0o755)
    with pytest.raises(LaunchError, match="node1:two"):
        launch.discover(str(script))
    script.write_text("#!/bin/sh\necho cannot reach the scheduler >&2\nexit 3\n")
    with pytest.raises(LaunchError, match="cannot reach the scheduler"):
        launch.discover(str(script))


def test_elastic_np_follows_min_and_max():
    opts = launch.LaunchOptions(np=1, hosts="localhost:2,127.0.0.1:1")
    launch.set_elastic(opts, min_np=2, max_np=3)
    assert launch.check_elastic(opts) == [("localhost", 2), ("127.0.0.1", 1)]
    assert opts.np == 2
    args = launch.elastic_args(opts)
    assert args[:4] == ["--min-np", "2", "--max-np", "3"] and "--blacklist-cooldown-range" in args


def test_new_hosts_are_ranked_in_the_order_listed():
    """Horovod ranks hosts it has not seen in a set's order; hvdkit's launcher, in the order the
    discovery printed them; hosts already ranked keep their places."""
    from horovod.runner.elastic import discovery

    from hvdkit import _horovodrun

    saved = (discovery.HostDiscoveryScript.find_available_hosts_and_slots,
             discovery.FixedHosts.find_available_hosts_and_slots, discovery.HostManager.__dict__["order_available_hosts"])
    try:
        _horovodrun._rank_hosts_in_discovery_order()
        listed = ["zeta", "alpha", "mid"]
        fixed = discovery.FixedHosts({h: 1 for h in listed})
        assert list(fixed.find_available_hosts_and_slots()) == listed
        order = discovery.HostManager.order_available_hosts
        assert order(set(listed), []) == listed
        assert order({"alpha", "mid"}, ["zeta", "alpha", "mid"]) == ["alpha", "mid"]  # zeta lost
        assert order(set(listed), ["alpha", "mid"]) == ["alpha", "mid", "zeta"]  # back, last
    finally:
        (discovery.HostDiscoveryScript.find_available_hosts_and_slots, discovery.FixedHosts.find_available_hosts_and_slots,
         order_fn) = saved
        discovery.HostManager.order_available_hosts = order_fn


def _workers(*spec: tuple[str, str, int]) -> list[Worker]:
    table = [encode_worker(host, token, lr, False) for host, token, lr in spec]
    return decode_workers(table)


def test_membership_record_follows_workers_not_ranks():
    start = _workers(("a", "t0", 0), ("a", "t1", 1), ("b", "t2", 0))
    record = initial_record(start, 0, "run", "job", 1, 1000)
    assert [m["ref"] for m in record["members"].values()] == ["rank0", "rank1", "rank2"]
    # t1 dies; t2 is renumbered to rank 1
    after = _workers(("a", "t0", 0), ("b", "t2", 0))
    record, change = plan_change(record, after, 40, "failure", 1, 2000)
    assert change["size"] == 2 and [m["ref"] for m in change["left"]] == ["rank1"]
    assert change["renumbered"] == [("rank2", 1)] and change["joined"] == []
    assert record["members"]["t2"]["ref"] == "rank2"  # it keeps its own child run
    assert record["epochs"][0]["end_step"] == 40 and record["epochs"][1]["start_step"] == 40
    # a new worker joins: a child run of its own, named for its rank and epoch
    record, change = plan_change(record, _workers(("a", "t0", 0), ("b", "t2", 0), ("b", "t3", 1)), 90,
                                 "hosts_updated", 1, 3000)
    assert [m["ref"] for m in change["joined"]] == ["rank2.m2"] and change["left"] == []
    assert [e["size"] for e in record["epochs"]] == [3, 2, 3]
    # same members again (a failure that lost nobody): no change
    same, none = plan_change(record, _workers(("a", "t0", 0), ("b", "t2", 0), ("b", "t3", 1)), 95, "failure", 1, 4000)
    assert none is None and len(same["epochs"]) == 3
