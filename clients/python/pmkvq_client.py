#!/usr/bin/env python3
"""pmkvq example client: stock grpcio, no generated code.

The API is discovered through server reflection, health is checked with the standard grpc.health.v1 service,
then a Generate stream is printed as it arrives.

    pip install grpcio grpcio-health-checking grpcio-reflection
    python3 clients/python/pmkvq_client.py --server 127.0.0.1:50051 --chat "What is 7 * 8?"
    python3 clients/python/pmkvq_client.py --server 127.0.0.1:50051 --prompt "Once upon a time" --json
"""

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "pmkvq.v1.PmkvqService"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT or unix:/path/to/socket")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text used verbatim")
    src.add_argument("--chat", help="a user message (the model's chat template is applied)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=None, help="unset = greedy")
    ap.add_argument("--kv-method", default=None, help="e.g. fp16, pmkvq, kivi:2 (unset = server default)")
    ap.add_argument("--json", action="store_true", help="print one JSON summary instead of streaming text")
    args = ap.parse_args()

    # grpcio would send a unix socket's path as :authority, which HTTP/2 servers reject; name the host instead.
    options = [("grpc.default_authority", "localhost")] if args.server.startswith("unix:") else []
    channel = grpc.insecure_channel(args.server, options=options)

    # 1. Standard health check.
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    health_name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    if status.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"pmkvqd is {health_name}", file=sys.stderr)
        return 69

    # 2. Discover the API by reflection and build message classes from it.
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName(SERVICE)
    gen = svc.FindMethodByName("Generate")
    Request = message_factory.GetMessageClass(gen.input_type)
    Response = message_factory.GetMessageClass(gen.output_type)

    req = Request()
    if args.prompt is not None:
        req.text = args.prompt
    else:
        m = req.chat.messages.add()
        m.role, m.content = "user", args.chat
    req.stopping.max_tokens = args.max_tokens
    if args.temperature is not None:
        req.sampling.temperature = args.temperature
    if args.kv_method:
        req.kv.method = args.kv_method

    # 3. Stream.
    call = channel.unary_stream(
        f"/{SERVICE}/Generate",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    ids, text, complete, request_id = [], [], None, ""
    try:
        for msg in call(req, timeout=600):
            request_id = msg.request_id
            kind = msg.WhichOneof("kind")
            if kind == "chunk":
                ids.extend(msg.chunk.token_ids)
                text.append(msg.chunk.text)
                if not args.json:
                    print(msg.chunk.text, end="", flush=True)
            elif kind == "complete":
                complete = json_format.MessageToDict(msg.complete, preserving_proto_field_name=True)
            elif kind == "error":
                print(f"\nserver error: {msg.error.message}", file=sys.stderr)
                return 70
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}", file=sys.stderr)
        return 64 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 69

    if complete is None:
        print("the stream ended without a completion", file=sys.stderr)
        return 70
    if args.json:
        print(json.dumps({
            "health": health_name,
            "services": services,
            "request_id": request_id,
            "ids": ids,
            "text": "".join(text),
            "finish_reason": complete.get("finish_reason"),
            "usage": complete.get("usage", {}),
            "timings": complete.get("timings", {}),
        }))
    else:
        usage = complete.get("usage", {})
        print(f"\n[{request_id}] {complete.get('finish_reason')} | {usage.get('completion_tokens', 0)} tokens",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
