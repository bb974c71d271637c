"""Which tenant a node-service client gets, from its credentials and the policy (sandbox.node.auth)."""

from __future__ import annotations

import pytest

from sandbox import JobSpec, Limits
from sandbox.core.limits import ConfigError, Policy
from sandbox.node.auth import Peer, Refused, within_rights, may_use, tenant_for

POLICY = {"tenants": {"default": {}, "alice": {"users": ["alice", 1001]}, "lab": {"groups": ["root", 4242]}}}


def peer(uid: int, user: str, *groups: int) -> Peer:
    return Peer(pid=1, uid=uid, gid=groups[0] if groups else uid, user=user, groups=frozenset(groups or (uid,)))


def test_users_and_groups_by_name_or_number_choose_the_tenant():
    policy = Policy.from_dict(POLICY, "t")
    assert tenant_for(policy, peer(1001, "1001"), None) == "alice"
    assert tenant_for(policy, peer(2000, "alice"), None) == "alice"
    assert tenant_for(policy, peer(3000, "carol", 3000, 4242), None) == "lab"
    assert tenant_for(policy, peer(3001, "dave", 0), "lab") == "lab"  # group root, by name
    assert tenant_for(policy, peer(3002, "erin"), None) == "default"
    assert may_use(policy, peer(0, "root"), "alice")  # root may name any tenant


def test_a_client_may_not_name_a_tenant_it_is_not_listed_in_and_unknown_users_may_be_refused():
    policy = Policy.from_dict(POLICY, "t")
    with pytest.raises(Refused, match="uid 3002 \\(erin\\) may not submit as tenant 'alice'"):
        tenant_for(policy, peer(3002, "erin"), "alice")
    with pytest.raises(Refused, match="tenant 'nope': no such tenant"):
        tenant_for(policy, peer(3002, "erin"), "nope")
    strict = Policy.from_dict({**POLICY, "service": {"unknown_users": "refuse"}}, "t")
    with pytest.raises(Refused, match='is in no tenant.s users/groups and \\[service\\] unknown_users = "refuse"'):
        tenant_for(strict, peer(3002, "erin"), None)
    assert tenant_for(strict, peer(1001, "1001"), None) == "alice"


def test_what_a_client_may_ask_is_capped_by_its_tenant_or_the_defaults():
    policy = Policy.from_dict({"defaults": {"memory": "1GiB"}, "tenants": {"lab": {"priority": 5}},
                               "job_types": {"urgent": {"priority": 9}}}, "t")
    within_rights(policy, JobSpec(kernel="k.py", tenant="lab", priority=5, limits=Limits(memory="512MiB")))
    within_rights(policy, JobSpec(kernel="k.py", tenant="lab", priority=3))
    with pytest.raises(ConfigError, match="priority 6 is above tenant 'lab''s 5"):
        within_rights(policy, JobSpec(kernel="k.py", tenant="lab", priority=6))
    with pytest.raises(ConfigError, match="priority 1 is above tenant .default..s 0"):
        within_rights(policy, JobSpec(kernel="k.py", priority=1))
    # no [tenants.default] here: a job without a tenant still has the defaults as its ceiling
    with pytest.raises(ConfigError, match="without a tenant may lower its limits.*memory"):
        within_rights(policy, JobSpec(kernel="k.py", limits=Limits(memory="500GiB")))
    with pytest.raises(ConfigError, match="may lower its limits"):
        within_rights(policy, JobSpec(kernel="k.py", tenant="lab", limits=Limits(wall_time=None, memory="2GiB")))
    # a job type does not lift a job past its tenant's priority
    assert within_rights(policy, JobSpec(kernel="k.py", tenant="lab", job_type="urgent")).priority == 5
    with pytest.raises(ConfigError, match="priority 9 is above tenant 'lab''s 5"):
        within_rights(policy, JobSpec(kernel="k.py", tenant="lab", job_type="urgent", priority=9))
    with pytest.raises(ConfigError, match=r"priority: Input should be greater than or equal to -1000000 \(got -1000"):
        JobSpec.parse({"kernel": "k.py", "priority": -10**400}, "job 1")  # ageing would overflow
