"""A small reader of NetworkPolicies, for tests/unit/test_deploy.py: whether the policies let
one pod (or an address outside the cluster) open a connection to another, by the rules of
Kubernetes' documentation: a pod that no policy of a direction selects is not isolated in that
direction; the rules of the policies that select it add up; a connection needs the sender's
egress and the receiver's ingress. Named ports and ipBlocks matching pods are not modelled
(the manifests use neither)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (its namespace and labels) or an address outside."""

    name: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str | None = None

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace or ""}


def labels_matched(selector: Doc, labels: Mapping[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(_expression(e, labels) for e in selector.get("matchExpressions", []))


def _expression(expression: Doc, labels: Mapping[str, str]) -> bool:
    key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
    return {
        "In": key in labels and labels[key] in values,
        "NotIn": key not in labels or labels[key] not in values,
        "Exists": key in labels,
        "DoesNotExist": key not in labels,
    }[operator]


def _peer_matched(rule_peer: Doc, policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        if peer.ip is None:
            return False
        ip = ipaddress.ip_address(peer.ip)
        outside = [ipaddress.ip_network(c) for c in block.get("except", [])]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(ip in n for n in outside)
    if peer.namespace is None:  # an address outside the cluster matches only an ipBlock
        return False
    if "namespaceSelector" in rule_peer:
        if not labels_matched(rule_peer["namespaceSelector"], peer.namespace_labels):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return labels_matched(rule_peer.get("podSelector", {}), peer.labels)


def _port_matched(ports: list[Doc] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        low = entry.get("port")
        high = entry.get("endPort", low)
        if entry.get("protocol", "TCP") == protocol and (low is None or low <= port <= high):
            return True
    return False


def direction_allows(
    policies: list[Doc], pod: Peer, other: Peer, port: int, protocol: str, way: str
) -> bool:
    """Whether `pod`'s policies of one direction ("ingress" from `other`, or "egress" to it)
    allow the connection: a pod no policy of that direction selects is not isolated."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and labels_matched(p["spec"]["podSelector"], pod.labels)
        and way.capitalize() in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    side = "from" if way == "ingress" else "to"
    for policy in selecting:
        for rule in policy["spec"].get(way, []):
            peers = rule.get(side)
            namespace = policy["metadata"]["namespace"]
            matched = not peers or any(_peer_matched(p, namespace, other) for p in peers)
            if matched and _port_matched(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(
    policies: list[Doc], source: Peer, target: Peer, port: int, protocol: str = "TCP"
) -> bool:
    egress = source.namespace is None or direction_allows(
        policies, source, target, port, protocol, "egress"
    )
    ingress = target.namespace is None or direction_allows(
        policies, target, source, port, protocol, "ingress"
    )
    return egress and ingress
