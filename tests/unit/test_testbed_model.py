"""The testbed's pure parts: names, addresses, argv, inventories, fault rules."""

from pathlib import Path

import pytest
import yaml

from testbed import commands
from testbed.cli import parser
from testbed.model import MAX_HOSTS, Bed, Fault, TestbedError, new_bed


def test_addresses_are_inside_the_beds_own_subnet():
    bed = new_bed("demo", 5, used_indexes={0, 1})
    assert bed.index == 2
    assert str(bed.subnet) == "10.231.2.0/24"
    assert [h.address for h in bed.hosts] == [f"10.231.2.{i}" for i in range(11, 16)]
    assert bed.controller_address == "10.231.2.1"
    assert bed.upstream_address == "10.231.2.254"
    for h in bed.hosts:
        assert len(h.veth) <= 15, "Linux interface names are at most 15 bytes"


@pytest.mark.parametrize("name", ["", "Demo", "1abc", "toolongname", "a-b", "a_b"])
def test_bad_bed_names_are_refused(name):
    with pytest.raises(TestbedError, match="bed name"):
        new_bed(name, 1, set())


@pytest.mark.parametrize("count", [0, -1, MAX_HOSTS + 1])
def test_host_count_outside_the_range_is_refused(count):
    with pytest.raises(TestbedError, match="--hosts"):
        new_bed("x", count, set())


def test_all_ranges_taken():
    with pytest.raises(TestbedError, match="in use"):
        new_bed("x", 1, set(range(250)))


def test_state_round_trips_through_json():
    bed = new_bed("rt", 3, set())
    bed.hosts[0].leader = 42
    bed.faults.append(Fault("partition", {"a": ["h1"], "b": ["h2", "h3"]}))
    again = Bed.from_json(bed.to_json())
    assert again == bed


def test_unknown_host_names_the_known_ones():
    bed = new_bed("x", 2, set())
    with pytest.raises(TestbedError, match=r"no host 'h9' in bed 'x' \(hosts: h1, h2\)"):
        bed.host("h9")


def test_nspawn_argv_needs_no_host_systemd():
    bed = new_bed("x", 1, set())
    argv = commands.nspawn(bed, bed.hosts[0], Path("/r"))
    assert argv[0] == "systemd-nspawn"
    assert "--boot" in argv and "--register=no" in argv and "--keep-unit" in argv
    assert "--network-bridge=eucatb-x" in argv
    assert "--machine=x-h1" in argv


def test_inventory_pins_the_interpreter_and_lists_every_host(tmp_path):
    bed = new_bed("inv", 3, set())
    inv = yaml.safe_load(commands.inventory_yaml(bed, tmp_path / "k", tmp_path / "kh"))
    assert inv["all"]["vars"]["ansible_python_interpreter"] == "/usr/bin/python3"
    assert "StrictHostKeyChecking=yes" in inv["all"]["vars"]["ansible_ssh_common_args"]
    hosts = inv["all"]["children"]["testbed"]["hosts"]
    assert hosts == {h.name: {"ansible_host": h.address} for h in bed.hosts}


def test_ssh_config_and_known_hosts_pin_each_hosts_key(tmp_path):
    bed = new_bed("k", 2, set())
    kh = commands.known_hosts(bed, {"h1": "ssh-ed25519 AAA1", "h2": "ssh-ed25519 AAA2"})
    a1, a2 = (h.address for h in bed.hosts)
    assert kh.splitlines() == [f"h1,{a1} ssh-ed25519 AAA1", f"h2,{a2} ssh-ed25519 AAA2"]
    cfg = commands.ssh_config(bed, tmp_path / "id", tmp_path / "kh")
    assert "StrictHostKeyChecking yes" in cfg and f"HostName {bed.hosts[1].address}" in cfg


def test_nft_ruleset_without_faults_is_an_empty_accepting_table():
    bed = new_bed("n", 2, set())
    rules = commands.nft_ruleset(bed)
    assert "table bridge eucatb_n" in rules
    assert "drop" not in rules
    # replace atomically: add + delete + define in one `nft -f` transaction
    assert rules.index("add table") < rules.index("delete table") < rules.index("table bridge eucatb_n {")


def test_partition_drops_both_directions_and_arp():
    bed = new_bed("p", 3, set())
    bed.faults.append(Fault("partition", {"a": ["h1"], "b": ["h2", "h3"]}))
    rules = commands.nft_ruleset(bed)
    a, b2, b3 = (h.address for h in bed.hosts)
    assert f"ip saddr {{ {a} }} ip daddr {{ {b2}, {b3} }} drop" in rules
    assert f"ip saddr {{ {b2}, {b3} }} ip daddr {{ {a} }} drop" in rules
    assert "arp saddr ip" in rules


def test_isolate_and_cut_upstream_rules():
    bed = new_bed("i", 2, set())
    bed.faults = [Fault("isolate", {"host": "h2"}), Fault("cut-upstream", {"host": "h1"})]
    rules = commands.nft_ruleset(bed)
    assert 'iifname "vb-i-h2" drop' in rules and 'oifname "vb-i-h2" drop' in rules
    assert f"ip saddr {{ {bed.hosts[0].address} }} ip daddr {{ {bed.upstream_address} }} drop" in rules


def test_fault_rules_name_unknown_hosts():
    bed = new_bed("u", 1, set())
    bed.faults = [Fault("partition", {"a": ["h1"], "b": ["h7"]})]
    with pytest.raises(TestbedError, match="h7"):
        commands.nft_ruleset(bed)


def test_cli_parses_every_verb():
    p = parser()
    assert p.parse_args(["up", "--hosts", "3", "--name", "a"]).hosts == 3
    assert p.parse_args(["partition", "h1,h2", "h3"]).a == ["h1", "h2"]
    assert p.parse_args(["degrade", "h1", "--delay", "50", "--loss", "1"]).loss == 1.0
    assert p.parse_args(["pause", "h1", "euca-runtime"]).pattern == "euca-runtime"
    assert p.parse_args(["status"]).name is None
    assert p.parse_args(["down"]).name == "tb"
