# Regenerates the protocol stubs beside their .proto sources, with the grpcio-tools pinned in pyproject.toml.
PROTOS := $(wildcard protos/pagedserve/v1/*.proto)

.PHONY: protos test
protos:
	python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTOS)

test:
	python -m pytest -q
