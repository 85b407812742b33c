# The control plane (`pagedserve serve --worker ...`): CPU only, without torch or CUDA, which it never imports
# (tests/e2e/test_control_plane_without_torch.py serves with them hidden). Build from the repository root.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAGEDSERVE_LOG_FORMAT=json
RUN useradd --create-home --uid 10001 --user-group pagedserve
WORKDIR /app
# Dependencies first, pinned by the lock (generated from pyproject.toml): a source edit rebuilds only the layers below.
COPY docker/control-plane.lock.txt /tmp/control-plane.lock.txt
RUN pip install --requirement /tmp/control-plane.lock.txt
COPY . .
# The dependencies are all in place; --no-deps keeps torch out.
RUN pip install --no-deps . && rm -rf build
USER pagedserve
EXPOSE 50051 9400
ENTRYPOINT ["pagedserve"]
