#!/usr/bin/env python3
"""Calls a rewind coordinator from Python over mutual TLS: its health, the services it
describes by reflection, the cluster's members, the newest rollbacks and the audit chain.

Generate the stubs first, from the repository's root (grpcio-tools, see requirements.txt):

    python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        proto/rewind/v1/*.proto
    PYTHONPATH=gen python docs/clients/python/rewind_status.py \
        --coordinator 127.0.0.1:7443 --tls-dir /tmp/rewind-dev/tls

Only the leader serves ControlService; a follower answers UNAVAILABLE with the leader's address
in the `rewind-leader` metadata, which this client follows (once).

Exit status: 0 when the audit chain verifies, 1 when it does not, 2 on a usage or call error.
"""

import argparse
import json
import pathlib
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rewind.v1 import control_pb2, control_pb2_grpc

LEADER_METADATA_KEY = "rewind-leader"


def channel(address, tls_dir, identity, server_name):
    """A channel presenting `identity`'s certificate, trusting only the cluster's CA."""
    tls_dir = pathlib.Path(tls_dir)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.pem").read_bytes(),
        private_key=(tls_dir / f"{identity}.key").read_bytes(),
        certificate_chain=(tls_dir / f"{identity}.pem").read_bytes(),
    )
    # The coordinator's certificate names `localhost` and its addresses; dialled by IP, tell
    # TLS which name to check.
    options = [("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(address, credentials, options=options)


def health(chan, service=""):
    """The member's status for `service` ("" is the member as a whole)."""
    stub = health_pb2_grpc.HealthStub(chan)
    answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def services(chan):
    """Every service the member describes by reflection (v1alpha, which grpcio speaks)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(chan)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for answer in stub.ServerReflectionInfo(iter([request]), timeout=5):
        return sorted(service.name for service in answer.list_services_response.service)
    return []


def leader_address(error):
    """The leader's address a follower's UNAVAILABLE carries, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY:
            return value
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", default="127.0.0.1:7443")
    parser.add_argument("--tls-dir", required=True, help="holds ca.pem, <identity>.pem/.key")
    parser.add_argument("--identity", default="operator")
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--rollbacks", type=int, default=5, help="newest rollbacks to list")
    args = parser.parse_args()

    address = args.coordinator
    chan = channel(address, args.tls_dir, args.identity, args.server_name)
    report = {
        "member": address,
        "health": health(chan),
        "control_service": health(chan, "rewind.v1.ControlService"),
        "services": services(chan),
    }
    control = control_pb2_grpc.ControlServiceStub(chan)
    try:
        members = control.ListMembers(control_pb2.ListMembersRequest(), timeout=10)
    except grpc.RpcError as error:
        leader = leader_address(error)
        if error.code() != grpc.StatusCode.UNAVAILABLE or leader is None:
            raise
        address = leader
        chan = channel(address, args.tls_dir, args.identity, args.server_name)
        control = control_pb2_grpc.ControlServiceStub(chan)
        members = control.ListMembers(control_pb2.ListMembersRequest(), timeout=10)
    report["leader"] = address
    report["members"] = [
        {"id": member.id, "address": member.address, "role": member.role}
        for member in members.members
    ]
    rollbacks = control.ListRollbacks(
        control_pb2.ListRollbacksRequest(page_size=args.rollbacks), timeout=10
    )
    report["rollbacks"] = [
        {
            "rollback_id": rollback.rollback_id,
            "service": rollback.service,
            # Enum values by name, as rewindctl --output json prints them.
            "state": rollback.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[
                rollback.state
            ].name,
            "steps": len(rollback.steps),
        }
        for rollback in rollbacks.rollbacks
    ]
    audit = control.VerifyAudit(control_pb2.VerifyAuditRequest(), timeout=30)
    report["audit"] = {"ok": audit.ok, "entries": audit.entries, "head_hash": audit.head_hash}
    print(json.dumps(report, indent=2))
    return 0 if audit.ok else 1


def printable(text):
    """`text` with control characters shown as `?`: a server's words reach a terminal."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        print(f"rewind_status: {error.code().name}: {printable(error.details())}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        print(f"rewind_status: {error}", file=sys.stderr)
        sys.exit(2)
