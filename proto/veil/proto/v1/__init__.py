"""Generated gRPC/protobuf code for veil.v1 (see proto/generate.py)."""
