# Regenerates the protocol stubs beside their .proto sources, with the grpcio-tools pinned in pyproject.toml.
PROTOS := $(wildcard protos/pagedserve/v1/*.proto)

.PHONY: protos test lint
protos:
	python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTOS)

test:
	python -m pytest -q

# ruff, then mypy --strict over the installed package layout (a link tree, since package-dir maps several folders).
lint:
	ruff check .
	python .ci/mypy_link_tree.py
	mypy -p pagedserve -p tests -p benchmarks
