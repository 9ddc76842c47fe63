"""``horovodrun`` without its start-up probe: what ``hvdkit run`` executes.

Before launching, stock horovodrun asks "was Horovod built with Gloo/MPI?" by importing each
framework's extension in a forked process — TensorFlow first, even for a PyTorch job — which costs
seconds on every launch (11.7 s against 1.3 s for a 2-rank no-op job measured here). hvdkit's build
already checked exactly that and recorded it in the environment's build marker, so this shim
answers from the marker and then runs horovodrun's own command line unchanged. With no marker
(a Horovod hvdkit did not build) it falls through to the stock probe.

Elastic jobs get one more correction: Horovod's host discovery reads the script's lines into a
set and ranks hosts it has not seen before in that set's order, which changes from one launch to
the next (string hashing is salted per process), so rank 0 landed on any host. Here new hosts
are ranked in the order the discovery lists them, as a static ``-H`` list is: rank 0 on the first.

Two corrections keep secrets and hosts honest (see hvdkit.launch): every ssh command Horovod's
runner builds checks host keys (no ``StrictHostKeyChecking=no``; BatchMode), and the ``env
NAME=VALUE ...`` command line Gloo starts each rank with never names a secret. A local rank still
gets it, inherited from this process's environment (which is not on any command line); a remote
one does not, and the launcher already left secrets out of a multi-host job's environment.
"""

from __future__ import annotations

import sys


def _rank_hosts_in_discovery_order() -> None:
    from horovod.runner.elastic import discovery

    listed: list[str] = []  # hosts of the latest discovery, in the order it printed them

    def find_script_hosts(self) -> dict[str, int]:
        host_slots: dict[str, int] = {}
        for line in dict.fromkeys(ln.strip() for ln in self._execute_discovery_script().strip().split("\n")):
            host, _, slots = line.partition(":")
            if host:  # an empty output: no host ready yet
                host_slots[host] = int(slots) if slots else self._default_slots
        listed[:] = list(host_slots)
        return host_slots

    fixed_find = discovery.FixedHosts.find_available_hosts_and_slots

    def find_fixed_hosts(self) -> dict[str, int]:
        host_slots = fixed_find(self)
        listed[:] = list(host_slots)
        return host_slots

    def order_available_hosts(available_hosts, prev_host_assignment_order):
        # Hosts already ranked keep their places (Horovod's rule: older hosts, lower ranks).
        order = [h for h in prev_host_assignment_order if h in available_hosts]
        pos = {h: i for i, h in enumerate(listed)}
        order += sorted((h for h in available_hosts if h not in set(order)), key=lambda h: (pos.get(h, len(pos)), h))
        return order

    discovery.HostDiscoveryScript.find_available_hosts_and_slots = find_script_hosts
    discovery.FixedHosts.find_available_hosts_and_slots = find_fixed_hosts
    discovery.HostManager.order_available_hosts = staticmethod(order_available_hosts)


def _keep_secrets_off_command_lines() -> None:
    from horovod.runner import gloo_run

    from hvdkit.tracking._credentials import strip_secrets

    build = gloo_run._slot_info_to_command_fn

    def slot_info_to_command_fn(run_command, env):
        # Each rank's command is "env HOROVOD_RANK=... NAME=VALUE ... python ...", run by a shell
        # (ps shows it) or inside the ssh command for a remote host.
        return build(run_command, strip_secrets(env)[0])

    gloo_run._slot_info_to_command_fn = slot_info_to_command_fn  # launch_gloo and elastic look it up per call


def main() -> None:
    import horovod.common.util as util
    import horovod.runner.launch as launch

    from hvdkit.build import env as build_env
    from hvdkit.launch import use_host_key_checking

    marker = build_env.installed_build() or {}
    controllers = marker.get("controllers")
    built_for = marker.get("frameworks") or {}
    # Trust the marker only while the frameworks it was built against are still those installed.
    if controllers and built_for and all(build_env.framework_version(fw) == v for fw, v in built_for.items()):
        # The launcher module imported these by name, so patch both places.
        for mod in (util, launch):
            mod.gloo_built = lambda verbose=False: bool(controllers.get("gloo"))
            mod.mpi_built = lambda verbose=False: bool(controllers.get("mpi"))
    _rank_hosts_in_discovery_order()
    use_host_key_checking()
    _keep_secrets_off_command_lines()
    sys.argv[0] = "horovodrun"
    launch.run_commandline()


if __name__ == "__main__":
    main()
