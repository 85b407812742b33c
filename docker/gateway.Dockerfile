# The Shepherd Model Gateway (`smg launch --backend vllm ...`): OpenAI- and Anthropic-compatible HTTP in front of
# pagedserve servers, which it reaches over vLLM's engine protocol. Only the pinned smg wheel; no pagedserve code.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --user-group smg
COPY docker/gateway.lock.txt /tmp/gateway.lock.txt
RUN pip install --requirement /tmp/gateway.lock.txt
USER smg
EXPOSE 30000 29000
ENTRYPOINT ["smg"]
