# Regenerates the protocol stubs beside their .proto sources, with the grpcio-tools pinned in pyproject.toml, and the
# descriptor set that reflection serves: the generated stubs leave out the .proto comments, the set keeps them
# (--include_source_info), so `grpcurl describe` documents the API.
PROTOS := $(wildcard protos/pagedserve/v1/*.proto)
DESCRIPTOR_SET := protos/pagedserve/v1/descriptors.binpb

.PHONY: protos test lint
protos:
	python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTOS)
	python -m grpc_tools.protoc -I protos --include_source_info --include_imports \
		--descriptor_set_out=$(DESCRIPTOR_SET) $(PROTOS)

test:
	python -m pytest -q

# ruff, then mypy --strict over the installed package layout (a link tree, since package-dir maps several folders).
lint:
	ruff check .
	python .ci/mypy_link_tree.py
	mypy -p pagedserve -p tests -p benchmarks
