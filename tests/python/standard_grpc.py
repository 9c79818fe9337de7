#!/usr/bin/env python3
"""The standard gRPC tooling's view of a rewind member, for tests/tests/t47_standard_grpc.rs:
health checks and server reflection through grpcio's own packages (grpcio-health-checking,
grpcio-reflection), never through rewind's code.

    standard_grpc.py ADDRESS TLS_DIR check SERVICE [--no-certificate]
    standard_grpc.py ADDRESS TLS_DIR watch SERVICE
    standard_grpc.py ADDRESS TLS_DIR reflect

TLS_DIR "-" means plaintext (the coordinator's `health.probe-listen` port).

Prints one JSON object per line; a failed call prints {"error": CODE} and exits 0, so the test
reads every answer the same way.
"""

import json
import pathlib
import sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def say(**fields):
    print(json.dumps(fields), flush=True)


def channel(address, tls_dir, certificate=True):
    if tls_dir == "-":
        return grpc.insecure_channel(address)
    tls_dir = pathlib.Path(tls_dir)
    root = (tls_dir / "ca.pem").read_bytes()
    if certificate:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=(tls_dir / "operator.key").read_bytes(),
            certificate_chain=(tls_dir / "operator.pem").read_bytes(),
        )
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    options = [("grpc.ssl_target_name_override", "localhost")]
    return grpc.secure_channel(address, credentials, options=options)


def status_name(status):
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def check(chan, service):
    stub = health_pb2_grpc.HealthStub(chan)
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        say(status=status_name(answer.status))
    except grpc.RpcError as error:
        say(error=error.code().name)


def watch(chan, service):
    stub = health_pb2_grpc.HealthStub(chan)
    try:
        for answer in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
            say(status=status_name(answer.status))
        say(end="OK")
    except grpc.RpcError as error:
        say(end=error.code().name)


def reflect(chan):
    """Lists services and describes ControlService through both versions of reflection."""
    versions = {
        "v1alpha": reflection_pb2_grpc.ServerReflectionStub(chan).ServerReflectionInfo,
        # grpcio-reflection ships v1alpha only; v1's messages are the same on the wire.
        "v1": chan.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        ),
    }
    for version, call in versions.items():
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="rewind.v1.ControlService"
            ),
        ]
        try:
            answers = list(call(iter(requests), timeout=10))
        except grpc.RpcError as error:
            say(version=version, error=error.code().name)
            continue
        services = sorted(s.name for s in answers[0].list_services_response.service)
        methods = []
        for encoded in answers[1].file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(encoded)
            for service in file.service:
                if service.name == "ControlService":
                    methods = [method.name for method in service.method]
        say(version=version, services=services, control_methods=methods)


def main():
    address, tls_dir, command = sys.argv[1:4]
    rest = sys.argv[4:]
    if command == "check":
        chan = channel(address, tls_dir, certificate="--no-certificate" not in rest)
        check(chan, rest[0])
    elif command == "watch":
        watch(channel(address, tls_dir), rest[0])
    elif command == "reflect":
        reflect(channel(address, tls_dir))
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
