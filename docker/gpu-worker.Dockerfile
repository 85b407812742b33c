# A GPU worker (`pagedserve worker --device cuda`): the base image's CUDA build of torch, CuPy, and the kernels
# compiled at run time by NVRTC into CUPY_CACHE_DIR (a volume in compose.yaml, so a restart does not compile again).
# Build from the repository root.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUPY_CACHE_DIR=/var/cache/pagedserve/cupy
RUN useradd --create-home --uid 10001 --user-group pagedserve \
    && mkdir -p /var/cache/pagedserve/cupy && chown -R pagedserve:pagedserve /var/cache/pagedserve
WORKDIR /app
# Dependencies first, pinned by the lock (generated from pyproject.toml, torch left to the base image): a source edit
# rebuilds only the layers below.
COPY docker/gpu-worker.lock.txt /tmp/gpu-worker.lock.txt
RUN pip install --requirement /tmp/gpu-worker.lock.txt
COPY . .
# The dependencies are all in place; --no-deps keeps the base image's torch.
RUN pip install --no-deps . && rm -rf build
USER pagedserve
EXPOSE 50061
ENTRYPOINT ["pagedserve"]
